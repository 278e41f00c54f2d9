"""OpenAI request fields -> the constraint of a turn (oss_mlx/harmony/constrain.py): a Chat
`response_format` or a Responses `text.format`, and the tools rendered in the prompt; and the
check that a tool's `parameters` is a JSON Schema at all (`schema_error`)."""

from __future__ import annotations

import functools
import json

from oss_mlx.harmony.constrain import JSON_OBJECT, Spec, UnsupportedSchema, compiled_schema, tool_grammars


def response_format_schema(fmt, where: str = "response_format"):
    """The schema a Chat `response_format` (or a Responses `text.format`) asks for, or None.

    {"type": "text"} -> None; {"type": "json_object"} -> any JSON object; {"type":
    "json_schema", "json_schema": {"name", "schema", "strict"}} (Chat) or {"type": "json_schema",
    "name", "schema", "strict"} (Responses) -> its schema. Returns (schema, name, description).
    Raises UnsupportedSchema for anything else.
    """
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise UnsupportedSchema(f"{where}: must be an object with a `type`")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT, None, None
    if kind == "json_schema":
        body = fmt.get("json_schema", fmt)
        if not isinstance(body, dict) or "schema" not in body:
            raise UnsupportedSchema(f"{where}: a json_schema format needs a `schema`")
        return body["schema"], body.get("name"), body.get("description")
    raise UnsupportedSchema(f"{where}.type: {kind!r} is not supported (text, json_object, json_schema)")


def response_format_instructions(schema: dict, name: str | None, description: str | None) -> str:
    """The developer-message section that tells the model the format (docs/harmony.md §5.4):
    `# Response Formats\\n\\n## {name}\\n\\n// {description}\\n{json schema}`."""
    head = f"# Response Formats\n\n## {name or 'response'}\n\n"
    if description:
        head += f"// {description}\n"
    return head + json.dumps(schema, separators=(",", ":"))


def request_spec(fmt, where: str, tools, constrain_tools: bool = True):
    """The constraint of one OpenAI request and the developer-message section that announces
    its response format: (Spec, instructions or None).

    fmt: Chat `response_format` or Responses `text.format`; where: its field name, for errors.
    tools: the tools rendered in the prompt (objects with name, parameters, strict); their
    arguments are constrained unless constrain_tools is False. Raises UnsupportedSchema.
    """
    found = response_format_schema(fmt, where)
    final_grammar = instructions = None
    if found is not None:
        schema, name, description = found
        field_ = f"{where}.json_schema.schema" if "json_schema" in fmt else f"{where}.schema"
        final_grammar = compiled_schema(json.dumps(schema), field_, False)
        instructions = response_format_instructions(schema, name, description)
    tool_map = {}
    if constrain_tools:
        # A tool may say where its calls go (`recipient`, e.g. a namespaced tool); else harmony's
        # function namespace.
        tool_map = tool_grammars({
            getattr(t, "recipient", None) or f"functions.{t.name}":
                (t.parameters, bool(getattr(t, "strict", False))) for t in tools})
    return Spec(final_grammar, tool_map), instructions


def schema_error(schema) -> str | None:
    """Why `schema` is not a valid JSON Schema (checked against the JSON Schema meta-schema, by
    the jsonschema package), or None. A schema that names its draft (`$schema`) is checked
    against that draft; one that does not, against 2020-12 or else draft 7 (what most clients'
    schema generators write): either will do."""
    return _schema_error(json.dumps(schema, sort_keys=True))


@functools.lru_cache(maxsize=1024)  # agents send the same tools with every request
def _schema_error(text: str) -> str | None:
    from jsonschema import Draft7Validator, Draft202012Validator, validators
    from jsonschema.exceptions import SchemaError

    schema = json.loads(text)
    named = validators.validator_for(schema, default=None) if isinstance(schema, dict) else None
    first = None
    for kind in [named] if named is not None else [Draft202012Validator, Draft7Validator]:
        try:
            kind.check_schema(schema)
            return None
        except SchemaError as e:
            if first is None:
                where = "/".join(str(p) for p in e.path)
                first = f"{e.message[:200]}" + (f" (at {where})" if where else "")
    return first
