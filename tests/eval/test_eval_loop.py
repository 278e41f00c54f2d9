"""The long agent loop on a scripted model behind the real engine: where the format breaks."""

from __future__ import annotations

import json

import pytest
from support.evalkit import call_reply, good_call, scripted_engine, text_reply

from oss_mlx.eval.agent_loop import run_loop, step_value
from oss_mlx.eval.settings import Settings

CONSTRAINED = Settings(model="scripted", reasoning="low", date="2026-01-01")
FREE = Settings(model="scripted", reasoning="low", date="2026-01-01", constrain=False)


BREAKS = {
    # the call written into the answer text instead of a tool message
    "call_in_content": (CONSTRAINED, text_reply('functions.get_task({"step": 9})')),
    # a control token inside the arguments: the harmony stream no longer parses
    "malformed": (FREE, ('<|channel|>commentary to=functions.get_task <|constrain|>json'
                         '<|message|>{"step": 9<|channel|>}<|call|>')),
    "bad_arguments": (FREE, call_reply("get_task", {"step": "nine"}, analysis=False)),
    "bad_json": (FREE, ('<|channel|>commentary to=functions.get_task <|constrain|>json'
                        '<|message|>{"step": 9,,}<|call|>')),
    "unknown_tool": (FREE, call_reply("get_weather", {"city": "Paris"}, analysis=False)),
    "bad_stop": (FREE, ('<|channel|>commentary to=functions.get_task <|constrain|>json'
                        '<|message|>{"step": 9}<|end|><|start|>assistant<|channel|>final'
                        '<|message|>Done.<|return|>')),
}


@pytest.mark.parametrize("kind", list(BREAKS))
def test_a_break_at_call_17_is_reported_as_17(encoding, kind):
    settings, broken = BREAKS[kind]
    engine, model = scripted_engine(encoding, [good_call(i) for i in range(1, 17)] + [broken])
    report = run_loop(engine, settings, target=32)
    assert (report.first_break, report.kind, report.calls, report.end) == (17, kind, 16, "break")
    assert [t["verdict"] for t in report.turns] == ["ok"] * 16 + [kind]
    assert len(model.prompts) == 17 and not model.queue


def test_each_result_goes_back_as_a_tool_message(encoding):
    engine, model = scripted_engine(encoding, [good_call(i) for i in range(1, 4)]
                                    + [text_reply("Three calls in.")])
    report = run_loop(engine, CONSTRAINED, target=32)
    assert (report.first_break, report.end, report.calls) == (None, "answered", 3)
    # The 4th request prefills only what is new: the 3rd call's result, as a tool message.
    new = encoding.decode(model.prompts[3])
    assert ('<|start|>functions.get_task to=assistant<|channel|>commentary<|message|>'
            '{"step": 2, "instruction": "Record the value 84 under the key \\"step-2\\", then '
            'read step 3."}<|end|><|start|>assistant') in new
    assert step_value(2) == 84


def test_a_clean_loop_of_32_calls_has_no_break(encoding):
    engine, model = scripted_engine(encoding, [good_call(i) for i in range(1, 33)])
    report = run_loop(engine, CONSTRAINED, target=32)
    assert (report.first_break, report.kind, report.calls, report.end) == (None, None, 32,
                                                                            "completed")
    assert report.generated_tokens == sum(t["generated_tokens"] for t in report.turns) > 32 * 10
    assert len(model.prompts) == 32 and not model.queue


def test_a_full_context_ends_the_loop_without_a_break(encoding):
    engine, _ = scripted_engine(encoding, [good_call(i) for i in range(1, 33)], max_context=600)
    report = run_loop(engine, CONSTRAINED, target=32)
    assert report.end == "context" and report.first_break is None
    assert 0 < report.calls < 32
    assert "context" in report.detail


def test_the_constraint_is_on_by_default_and_off_when_asked(encoding):
    """A script whose first call has a string where the schema wants an integer: without the
    constraint that is the break; with it the model cannot write it (the scripted token is
    masked, greedy sampling takes an allowed one), and the call that comes out is well formed."""
    import dataclasses

    bad = call_reply("get_task", {"step": "nine"})
    engine, _ = scripted_engine(encoding, [bad])
    free = run_loop(engine, dataclasses.replace(FREE, max_tokens=60), target=1)
    assert (free.first_break, free.kind) == (1, "bad_arguments")

    engine, _ = scripted_engine(encoding, [bad])
    constrained = run_loop(engine, dataclasses.replace(CONSTRAINED, max_tokens=60), target=1)
    assert (constrained.first_break, constrained.end, constrained.calls) == (None, "completed", 1)
    call = constrained.turns[0]["calls"][0]
    assert call["name"] == "get_task" and '"nine"' not in call["arguments"]
    assert isinstance(json.loads(call["arguments"])["step"], int)
