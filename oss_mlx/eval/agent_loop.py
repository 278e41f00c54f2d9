"""A long agent loop: does the model keep to the harmony tool-call format call after call?

Users report gpt-oss-20b dropping out of the format after 10-12 calls in a long loop. This test
gives the model a checklist that needs a tool call at every step (read a step, record what it
says, read the next...), answers every call from stub tools, feeds each result back as a
harmony tool message, and stops at the first turn that is not a well-formed call:

  break (the format broke; `first_break` is that call's number, 1-based):
    malformed        the harmony stream broke: an unparseable header, a stray special token
    bad_stop         a call message not closed by <|call|>
    call_in_content  no call, but the answer text holds one (call markup, or a tool's name
                     followed by its arguments): the call landed in `content`
    unknown_tool     a call to a tool that was not declared
    wrong_channel    a call written on the final channel
    bad_json         arguments that are not JSON
    bad_arguments    JSON arguments that do not match the tool's schema
  end (not a format break):
    completed        `target` consecutive well-formed calls
    answered         the model answered in plain text before the checklist was done
    length           a turn ran out of max_tokens
    context          the conversation no longer fits the model's context
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from oss_mlx.eval.functions import ToolSchema
from oss_mlx.eval.turns import constraint_spec, looks_like_call, run_turn

DEFAULT_CALLS = 32

TOOLS = [
    {"name": "get_task", "description": "Read one step of the checklist.",
     "parameters": {"type": "object", "additionalProperties": False, "required": ["step"],
                    "properties": {"step": {"type": "integer",
                                            "description": "The step number, from 1."}}}},
    {"name": "record", "description": "Record a value under a key.",
     "parameters": {"type": "object", "additionalProperties": False,
                    "required": ["key", "value"],
                    "properties": {"key": {"type": "string"}, "value": {"type": "integer"}}}},
]

TASK = ("Work through my checklist with the tools, one step at a time. Start by reading step 1 "
        "with get_task. Each step tells you a value to record with record; record it, then read "
        "the next step. Do not stop, summarise or ask me anything until get_task says the "
        "checklist is complete; then tell me how many steps you recorded.")


def step_value(step: int) -> int:
    return (step * 37) % 90 + 10


def tool_result(name: str, args: dict, steps: int) -> str:
    """The stub tools' answers: each one says what to do next, so the chain never ends early."""
    if name == "get_task":
        n = args.get("step")
        if n > steps:
            return json.dumps({"complete": True, "message": "The checklist is complete."})
        return json.dumps({"step": n, "instruction": f"Record the value {step_value(n)} under "
                           f"the key \"step-{n}\", then read step {n + 1}."})
    m = re.fullmatch(r"step-(\d+)", str(args.get("key", "")))
    nxt = f"Read step {int(m.group(1)) + 1}." if m else "Read the next step."
    return json.dumps({"recorded": args.get("key"), "next": nxt})


def schema_error(schema: dict, args) -> str | None:
    """Why `args` does not match one of TOOLS' schemas (flat objects of integers and
    strings), or None."""
    if not isinstance(args, dict):
        return f"arguments are a JSON {type(args).__name__}, not an object"
    props = schema["properties"]
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        return f"missing {', '.join(missing)}"
    extra = [k for k in args if k not in props]
    if extra and schema.get("additionalProperties") is False:
        return f"unexpected {', '.join(extra)}"
    for k, v in args.items():
        want = props.get(k, {}).get("type")
        if want == "integer" and (type(v) is not int):
            return f"{k} is not an integer: {v!r}"
        if want == "string" and not isinstance(v, str):
            return f"{k} is not a string: {v!r}"
    return None


@dataclass
class Check:
    """How one turn went: broke (a format break), ended (the loop stops without one), else a
    well-formed call with its parsed arguments."""

    broke: str | None = None
    ended: str | None = None
    detail: str = ""
    args: dict | None = None


def check_turn(turn) -> Check:
    names = {t["name"]: t for t in TOOLS}
    if turn.stop == "context":
        return Check(ended="context", detail=turn.error)
    if turn.stop == "malformed":
        return Check(broke="malformed", detail="the harmony stream broke")
    if not turn.calls:
        text = "\n".join(x for x in (turn.commentary, turn.final) if x)
        if looks_like_call(text, names):
            return Check(broke="call_in_content", detail=text[:200])
        if turn.stop == "length":
            return Check(ended="length", detail="the turn ran out of max_tokens")
        return Check(ended="answered", detail=turn.final[:200])
    call = turn.calls[0]
    if turn.stop != "tool_call" or len(turn.calls) > 1:
        return Check(broke="bad_stop", detail=f"stop {turn.stop!r} after {len(turn.calls)} call(s)")
    if call["name"] not in names:
        return Check(broke="unknown_tool", detail=str(call.get("recipient")))
    if call.get("channel") == "final":
        return Check(broke="wrong_channel", detail="a call on the final channel")
    try:
        args = json.loads(call["arguments"])
    except json.JSONDecodeError as e:
        return Check(broke="bad_json", detail=f"{e}: {call['arguments'][:200]!r}")
    err = schema_error(names[call["name"]]["parameters"], args)
    if err:
        return Check(broke="bad_arguments", detail=err)
    return Check(args=args)


@dataclass
class LoopReport:
    """calls: the consecutive well-formed calls made; first_break: the number of the call at
    which the format first broke (None when it never did); kind: which break (module doc);
    end: "break" or why the loop stopped otherwise."""

    target: int
    calls: int = 0
    first_break: int | None = None
    kind: str | None = None
    end: str = "completed"
    detail: str = ""
    turns: list = field(default_factory=list)
    generated_tokens: int = 0
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {"kind": "loop", "target": self.target, "calls": self.calls,
                "first_break": self.first_break, "break": self.kind, "end": self.end,
                "detail": self.detail, "turns": self.turns,
                "generated_tokens": self.generated_tokens, "wall_s": round(self.wall_s, 4)}


def run_loop(engine, settings, target: int = DEFAULT_CALLS, on_turn=None) -> LoopReport:
    """Run the checklist until `target` well-formed calls, a break, or another end.
    on_turn(report): called after each turn (progress)."""
    from oss_mlx.harmony import build_conversation, tool_result_message, user_message

    steps = (target + 1) // 2  # a read and a record per step
    spec = constraint_spec([ToolSchema(t["name"], t["parameters"]) for t in TOOLS],
                           settings.constrain)
    history = [user_message(TASK)]
    report = LoopReport(target=target)
    for i in range(1, target + 1):
        conv = build_conversation(history, reasoning=settings.reasoning, date=settings.date,
                                  tools=TOOLS)
        turn = run_turn(engine, conv, settings, spec, key="agent_loop")
        check = check_turn(turn)
        report.turns.append({"call": i, "output": turn.output, **turn.to_dict(),
                             "verdict": check.broke or check.ended or "ok"})
        report.generated_tokens += turn.generated_tokens
        report.wall_s += turn.wall_s
        if check.broke or check.ended:
            report.end = "break" if check.broke else check.ended
            report.first_break = i if check.broke else None
            report.kind, report.detail = check.broke, check.detail
            break
        report.calls = i
        call = turn.calls[0]
        history += turn.messages
        history.append(tool_result_message(call["recipient"],
                                           tool_result(call["name"], check.args, steps)))
        if on_turn:
            on_turn(report)
    if on_turn:
        on_turn(report)
    return report
