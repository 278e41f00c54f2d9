"""BFCL cases through the real engine on a scripted model, scored by BFCL's own checker.

The scripted model answers a sample of real cases (from the installed bfcl-eval) correctly,
wrongly, and with the call written as text on the final channel; the scores must be exactly
100%, 0% and the share of irrelevance cases (BFCL counts a text answer as "no call", which is
right there). Each verdict is also checked against BFCL's own evaluation functions, compiled
from the installed package's source.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("bfcl_eval", reason="bfcl-eval is not installed (pip install --no-deps "
                                        "bfcl-eval, see pyproject's eval extra)")
jsonschema = pytest.importorskip("jsonschema")

from support.evalkit import (bfcl_function, call_reply, correct_calls, dummy_args,  # noqa: E402
                     scripted_engine, text_reply, wrong_calls)

from oss_mlx.eval import bfcl  # noqa: E402
from oss_mlx.eval.functions import openai_tools  # noqa: E402
from oss_mlx.eval.runner import run_case  # noqa: E402
from oss_mlx.eval.settings import Settings  # noqa: E402

AST_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple",
                  "live_multiple")
IRRELEVANCE = ("irrelevance", "live_irrelevance")
PER_CATEGORY = 2
SETTINGS = Settings(model="scripted", reasoning="low", date="2026-01-01")


def _valid(case, calls) -> bool:
    """Whether every call's arguments satisfy the schema the model is shown (so the
    constraint lets the scripted tokens through)."""
    tools = {t["name"]: t for t in openai_tools(case.functions)}
    try:
        for name, args in calls:
            jsonschema.validate(args, tools[name]["parameters"])
    except (jsonschema.ValidationError, jsonschema.SchemaError, KeyError):
        return False
    return True


@pytest.fixture(scope="module")
def sample():
    """[(case, correct calls, wrong calls)]: the first cases of each category whose correct
    and wrong answers can be written as schema-valid JSON of scalars and lists."""
    out = []
    for cat in AST_CATEGORIES:
        found = 0
        for case in bfcl.load_cases(cat, limit=60):
            good = correct_calls(case)
            if not good or not good[0][1]:
                continue
            bad = wrong_calls(good)
            if _valid(case, good) and _valid(case, bad):
                out.append((case, good, bad))
                found += 1
            if found == PER_CATEGORY:
                break
        assert found == PER_CATEGORY, cat
    for cat in IRRELEVANCE:
        cases = [c for c in bfcl.load_cases(cat, limit=20) if c.functions][:PER_CATEGORY]
        for case in cases:
            tool = openai_tools(case.functions)[0]
            out.append((case, None, [(tool["name"], dummy_args(tool["parameters"]))]))
    return out


def _replies_for(case, calls):
    """One reply per call (gpt-oss calls one at a time); the parallel categories go on after
    each stand-in result, so their script ends with a text answer."""
    replies = [call_reply(name, args) for name, args in calls]
    if case.parallel:
        replies.append(text_reply("Done."))
    return replies


def _run(encoding, sample, script):
    """Run every case of the sample on a scripted engine; returns the records."""
    replies = []
    for case, good, bad in sample:
        replies += script(case, good, bad)
    engine, model = scripted_engine(encoding, replies)
    records = [run_case(engine, case, SETTINGS) for case, _, _ in sample]
    assert not model.queue, "every scripted reply was asked for"
    return records


def _accuracy(records) -> float:
    return sum(r["valid"] for r in records) / len(records)


def test_correct_answers_score_100(encoding, sample):
    def correct(case, good, bad):
        if good is None:  # irrelevance: the right answer is no call
            return [text_reply("I cannot help with that using these tools.")]
        return _replies_for(case, good)

    records = _run(encoding, sample, correct)
    assert [r["error"] for r in records if not r["valid"]] == []
    assert _accuracy(records) == 1.0
    parallel = [r for (case, good, _), r in zip(sample, records) if case.parallel]
    assert parallel and all(len(r["calls"]) >= 2 for r in parallel)


def test_wrong_answers_score_0(encoding, sample):
    records = _run(encoding, sample, lambda case, good, bad: _replies_for(case, bad))
    assert _accuracy(records) == 0.0
    by_kind = {r["category"]: r["error_type"] for r in records}
    assert by_kind["simple_python"].startswith("value_error")
    assert by_kind["irrelevance"] == "irrelevance_error:decoder_success"


def test_call_in_the_wrong_channel_is_a_miss(encoding, sample):
    """The right call written as text on the final channel: a miss in every AST category; in
    the irrelevance categories BFCL reads a text answer as "no call", which is right."""
    def as_text(case, good, bad):
        calls = good or bad
        return [text_reply(" ".join(f"functions.{n}({json.dumps(a)})" for n, a in calls))]

    records = _run(encoding, sample, as_text)
    n_irrelevance = sum(c.category in IRRELEVANCE for c, _, _ in sample)
    assert _accuracy(records) == n_irrelevance / len(sample) == 4 / 16
    for (case, _, _), r in zip(sample, records):
        assert r["calls"] == [] and r["call_in_text"]
        if case.category not in IRRELEVANCE:
            assert r["error_type"] == "ast_decoder:decoder_failed"


def test_partial_figure_is_exact(encoding, sample):
    """Every other case right: the score is exactly the share of right ones."""
    def alternate(case, good, bad):
        i = [c.id for c, _, _ in sample].index(case.id)
        if i % 2 == 0:
            return [text_reply("No tool fits.")] if good is None else _replies_for(case, good)
        return _replies_for(case, bad)

    records = _run(encoding, sample, alternate)
    assert [r["valid"] for r in records] == [i % 2 == 0 for i in range(len(sample))]
    assert _accuracy(records) == 0.5


def test_prompt_declares_the_tools_with_bfcl_names(encoding, sample):
    """The prompt is a harmony conversation with the case's functions ("." -> "_") and its
    question; the constraint compiled for them."""
    case, good, _ = next(s for s in sample if s[0].category == "simple_python")
    engine, _ = scripted_engine(encoding, _replies_for(case, good))
    record = run_case(engine, case, SETTINGS)
    prompt = record["prompt"]
    assert prompt.startswith("<|start|>system<|message|>")
    assert "Reasoning: low" in prompt and "Current date: 2026-01-01" in prompt
    assert f"type {good[0][0]} = " in prompt
    assert case.messages[0]["content"] in prompt
    assert record["output"][0].endswith("<|call|>")


# ---- our glue against BFCL's own functions ----------------------------------------------------


def _bfcl_evaluators():
    """BFCL's _evaluate_single_ast_entry / _evaluate_single_relevance_entry and the OpenAI
    Responses handler's decode_ast, from the installed source."""
    b = bfcl.require()
    decode = bfcl_function("model_handler/api_inference/openai_response.py", "decode_ast",
                           {"json": json}, cls="OpenAIResponsesHandler")
    handler = type("Handler", (), {"is_fc_model": True, "decode_ast": decode})()
    names = {"BaseHandler": object, "Language": b.enums.Language,
             "ReturnFormat": b.enums.ReturnFormat, "ast_checker": b.checker.ast_checker,
             "is_function_calling_format_output": b.utils.is_function_calling_format_output,
             "is_empty_output": b.utils.is_empty_output}
    ast_entry = bfcl_function("eval_checker/eval_runner.py", "_evaluate_single_ast_entry", names)
    rel_entry = bfcl_function("eval_checker/eval_runner.py", "_evaluate_single_relevance_entry",
                              names)
    return handler, ast_entry, rel_entry, b


def test_verdicts_match_bfcl_evaluation_runner(sample):
    handler, ast_entry, rel_entry, b = _bfcl_evaluators()
    outputs = []
    for case, good, bad in sample:
        for calls in filter(None, (good, bad)):
            outputs.append((case, [{"name": n, "arguments": json.dumps(a)} for n, a in calls], ""))
        outputs.append((case, [], "a text answer"))
        outputs.append((case, [], ""))
        outputs.append((case, [{"name": "f", "arguments": "{not json"}], ""))
    for case, calls, text in outputs:
        ours = bfcl.score(case, calls, text)
        result = bfcl.model_result(calls, text)
        if case.relevance:
            theirs = rel_entry(handler, case.id, result, {}, bfcl.CHECKER_MODEL, case.category)
        else:
            theirs = ast_entry(handler, case.id, result, case.ground_truth,
                               {"function": case.checker_functions}, bfcl.CHECKER_MODEL,
                               case.category, b.enums.Language.PYTHON,
                               b.enums.ReturnFormat.PYTHON)
        assert ours.valid == theirs["valid"], (case.id, calls, text)
        assert ours.error_type == theirs.get("error_type", ""), (case.id, calls, text)


def test_tool_conversion_matches_bfcl_on_every_case():
    """functions.openai_tools is BFCL's convert_to_tool (OpenAI Responses style) on every case
    of every category run by default."""
    import copy
    import re

    b = bfcl.require()
    from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI

    names = {"copy": copy, "re": re, "json": json, "ModelStyle": b.enums.ModelStyle,
             "GORILLA_TO_OPENAPI": GORILLA_TO_OPENAPI}
    cast = bfcl_function("model_handler/utils.py", "_cast_to_openai_type", names)
    names["_cast_to_openai_type"] = cast
    convert = bfcl_function("model_handler/utils.py", "convert_to_tool", names)
    n = 0
    for cat in bfcl.DEFAULT_CATEGORIES:
        for case in bfcl.load_cases(cat):
            theirs = convert(case.functions, GORILLA_TO_OPENAPI,
                             b.enums.ModelStyle.OPENAI_RESPONSES)
            assert [{k: v for k, v in t.items() if k != "type"} for t in theirs] == \
                openai_tools(case.functions), case.id
            n += 1
    assert n > 3000


def test_checker_import_leaves_bfcl_model_config_alone():
    """The stand-in for BFCL's model_config is gone once the checker is imported: a later
    import gets BFCL's real module (or fails for want of its API clients), never ours."""
    import sys

    bfcl.require()
    assert "bfcl_eval.constants.model_config" not in sys.modules
    assert not hasattr(sys.modules["bfcl_eval.constants"], "model_config")
    assert bfcl.require().checker.MODEL_CONFIG_MAPPING[bfcl.CHECKER_MODEL].underscore_to_dot
