"""A BFCL case through the engine, and BFCL's verdict on what the model did.

The request is what an OpenAI function-calling client sends for the case (BFCL's FC mode): the
case's messages, its functions as tools (functions.openai_tools), nothing else; the system
messages of the live categories become the developer message's instructions, as `serve` does.

gpt-oss writes one call per turn: `<|call|>` ends the turn, and the model is trained to make
several calls in succession, each after the previous one's result. So in the parallel
categories the runner answers each call with a stand-in result and lets the model go on, and
the calls of all those turns are its answer (up to MAX_CALLS; the turn that answers without a
call ends it). Everywhere else the first turn is the whole answer, exactly as BFCL reads one
response. (Read in one response, gpt-oss scores 0 on the parallel categories by construction.)
"""

from __future__ import annotations

import time

from oss_mlx.eval import bfcl
from oss_mlx.eval.functions import harmony_tools, openai_tools, tool_schemas
from oss_mlx.eval.turns import looks_like_call, run_turn

MAX_CALLS = 10  # the largest BFCL parallel case has 8 calls
STAND_IN_RESULT = '{"status": "done"}'


def case_messages(case: bfcl.Case):
    """(instructions or None, harmony messages) for the case's one turn."""
    from oss_mlx.harmony import assistant_message, user_message

    instructions, messages = [], []
    for m in case.messages:
        if m["role"] in ("system", "developer"):
            instructions.append(m["content"])
        elif m["role"] == "assistant":
            messages.append(assistant_message(m["content"]))
        else:
            messages.append(user_message(m["content"]))
    return "\n\n".join(instructions) or None, messages


def run_case(engine, case: bfcl.Case, settings) -> dict:
    """Run one case and score it; the record that goes to the results file."""
    from oss_mlx.harmony import build_conversation, tool_result_message
    from oss_mlx.eval.turns import constraint_spec

    tools = openai_tools(case.functions)
    spec = constraint_spec(tool_schemas(tools), settings.constrain)
    instructions, history = case_messages(case)
    t0 = time.perf_counter()
    calls, turns, prompt = [], [], None
    while True:
        conv = build_conversation(history, reasoning=settings.reasoning, date=settings.date,
                                  developer_instructions=instructions,
                                  tools=harmony_tools(tools) or None)
        if prompt is None:
            prompt = engine.encoding.decode(engine.render(conv))
        turn = run_turn(engine, conv, settings, spec, key=case.id)
        turns.append(turn)
        calls += turn.calls
        if not (case.parallel and turn.stop == "tool_call") or len(calls) >= MAX_CALLS:
            break
        history += turn.messages
        history += [tool_result_message(c["recipient"], STAND_IN_RESULT) for c in turn.calls]
    text = turns[-1].final
    verdict = bfcl.score(case, calls, text)
    names = [t["name"] for t in tools]
    return {
        "kind": "case", "id": case.id, "category": case.category,
        "valid": verdict.valid, "error_type": verdict.error_type, "error": verdict.error,
        "calls": [{"name": c["name"], "arguments": c["arguments"]} for c in calls],
        "text": text, "call_in_text": not calls and looks_like_call(text, names),
        "decoded": verdict.decoded, "prompt": prompt,
        "output": [t.output for t in turns], "turns": [t.to_dict() for t in turns],
        "context_full": any(t.stop == "context" for t in turns),
        "generated_tokens": sum(t.generated_tokens for t in turns),
        "wall_s": round(time.perf_counter() - t0, 4),
    }
