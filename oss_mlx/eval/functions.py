"""BFCL's function docs as the function tools a harmony prompt declares.

BFCL writes parameter types in its own vocabulary ("dict", "float", "tuple", "any", ...). For
OpenAI-style function-calling models it rewrites each doc with `convert_to_tool` and
`_cast_to_openai_type` (bfcl_eval/model_handler/utils.py) and its GORILLA_TO_OPENAPI table;
`openai_tools` is that code's OpenAI Responses path, ported line for line (that module cannot
be imported without tree-sitter and tenacity; tests/eval checks the port against it on every
case). The table itself is read from bfcl-eval.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolSchema:
    """What the constraint needs of a tool (constrain.request_spec reads name, parameters,
    strict): BFCL's docs are not strict, so unknown schema keywords are ignored, not refused."""

    name: str
    parameters: dict
    strict: bool = False


def _mapping() -> dict:
    from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI

    return GORILLA_TO_OPENAPI


def openai_tools(functions: list) -> list[dict]:
    """BFCL's convert_to_tool(functions, GORILLA_TO_OPENAPI, ModelStyle.OPENAI_RESPONSES),
    without the "type": "function" key: [{"name", "description", "parameters", ...}]."""
    mapping = _mapping()
    tools = []
    for item in copy.deepcopy(functions):
        if "." in item["name"]:
            # OpenAI tool names (and harmony recipients) allow no "."; BFCL's checker converts
            # the expected names the same way (underscore_to_dot).
            item["name"] = re.sub(r"\.", "_", item["name"])
        item["parameters"]["type"] = "object"
        item["parameters"]["properties"] = _cast_to_openai_type(
            item["parameters"]["properties"], mapping)
        tools.append(item)
    return tools


def _cast_to_openai_type(properties: dict, mapping: dict) -> dict:
    """BFCL's _cast_to_openai_type: its types to JSON Schema types, one or two levels deep as
    BFCL supports (lists of any, lists of lists, lists of dicts, dicts of any)."""
    for key, value in properties.items():
        if "type" not in value:
            properties[key]["type"] = "string"
        else:
            var_type = value["type"]
            if var_type == "float":
                properties[key]["format"] = "float"
                properties[key]["description"] += " This is a float type value."
            properties[key]["type"] = mapping.get(var_type, "string")
        if properties[key]["type"] in ("array", "object"):
            if "properties" in properties[key]:
                properties[key]["properties"] = _cast_to_openai_type(
                    properties[key]["properties"], mapping)
            elif "items" in properties[key]:
                items = properties[key]["items"]
                items["type"] = mapping[items["type"]]
                if items["type"] == "array" and "items" in items:
                    items["items"]["type"] = mapping[items["items"]["type"]]
                elif items["type"] == "object" and "properties" in items:
                    items["properties"] = _cast_to_openai_type(items["properties"], mapping)
    return properties


def harmony_tools(tools: list[dict]) -> list[dict]:
    """The tools as harmony.build_conversation takes them: name, description, parameters."""
    return [{"name": t["name"], "description": t.get("description", ""),
             "parameters": t["parameters"]} for t in tools]


def tool_schemas(tools: list[dict]) -> list[ToolSchema]:
    return [ToolSchema(t["name"], t["parameters"]) for t in tools]
