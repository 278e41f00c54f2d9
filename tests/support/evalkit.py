"""Helpers for the eval tests: scripted engines, answers built from BFCL's possible answers,
and BFCL's own functions compiled out of the installed package's source (the oracle).

BFCL's evaluation runner and handler utilities cannot be imported without their heavy
dependencies (pandas, tree-sitter, tenacity, the API clients), so `bfcl_function` compiles a
named function out of the installed file, unchanged, with the few names it uses supplied.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from support.scripted import ScriptedModel

from oss_mlx.engine import Engine

ANALYSIS = "<|channel|>analysis<|message|>I should use the tool.<|end|><|start|>assistant"


def call_reply(name: str, args: dict, analysis: bool = True) -> str:
    """A harmony reply that calls `name` with `args` (JSON, in the given key order)."""
    head = ANALYSIS if analysis else ""
    return (f"{head}<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>"
            f"{json.dumps(args)}<|call|>")


def text_reply(text: str) -> str:
    return ("<|channel|>analysis<|message|>Answer.<|end|><|start|>assistant"
            f"<|channel|>final<|message|>{text}<|return|>")


def good_call(i: int) -> str:
    """The agent loop's right call number i (1-based): read step k, then record its value."""
    from oss_mlx.eval.agent_loop import step_value

    k = (i + 1) // 2
    if i % 2:
        return call_reply("get_task", {"step": k}, analysis=(i == 1))
    return call_reply("record", {"key": f"step-{k}", "value": step_value(k)}, analysis=False)


def scripted_engine(encoding, replies=(), max_context: int = 8192):
    model = ScriptedModel(*replies, encoding=encoding, max_context=max_context)
    return Engine(model, encoding), model


# ---- answers from BFCL's possible answers -----------------------------------------------------


def _doc(case, name):
    return next(f for f in case.functions if f["name"] == name)


def _scalar_or_list(v) -> bool:
    if isinstance(v, list):
        return all(not isinstance(x, (dict, list)) for x in v)
    return not isinstance(v, dict)


def correct_calls(case):
    """[(shown name, args)] that BFCL's possible answers accept: each parameter's first
    possible value, optional ones ("" first) left out, in the schema's property order (the
    constraint writes objects in that order). None when an answer holds a dict (not needed for
    a sample)."""
    out = []
    for call in case.ground_truth:
        (name, params), = call.items()
        args = {}
        for p in _doc(case, name)["parameters"]["properties"]:
            if p in params and params[p] and params[p][0] != "":
                if not _scalar_or_list(params[p][0]):
                    return None
                args[p] = params[p][0]
        out.append((name.replace(".", "_"), args))
    return out


def wrong_value(v):
    """A value of the same JSON type that no possible answer of the sample holds."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 7919
    if isinstance(v, float):
        return v + 7919.5
    if isinstance(v, str):
        return v + " qqq"
    if isinstance(v, list):
        return v + [v[0]] if v else ["qqq"]
    raise TypeError(type(v))


def wrong_calls(calls):
    """The same calls with the first call's first argument changed."""
    (name, args), rest = calls[0], calls[1:]
    key = next(iter(args))
    return [(name, {**args, key: wrong_value(args[key])})] + rest


def dummy_args(schema: dict) -> dict:
    """Schema-valid arguments for a tool's required parameters (an irrelevance case's call)."""
    fill = {"integer": 1, "number": 1.5, "string": "x", "boolean": True, "array": [],
            "object": {}}
    props = schema["properties"]
    return {p: fill[props[p]["type"]] for p in props if p in schema.get("required", [])}


# ---- BFCL's own code, from the installed package ----------------------------------------------


def bfcl_function(relpath: str, name: str, namespace: dict, cls: str | None = None):
    """The function `name` (a method of class `cls` when given) from bfcl_eval/`relpath`,
    compiled from the installed source with `namespace` as its globals."""
    import bfcl_eval

    path = Path(bfcl_eval.__file__).parent / relpath
    body = ast.parse(path.read_text()).body
    if cls is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = dict(namespace)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), scope)
    return scope[name]
