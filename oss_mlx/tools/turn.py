"""One assistant turn with built-in tools: generate, run the model's tool calls, generate again.

    from oss_mlx.tools import Toolbox, PythonSession, run_turn

    box = Toolbox(python=PythonSession())
    for ev in run_turn(engine, conversation, box, params, cancel=cancel):
        if ev.type == "delta": ...          # the engine's events, as Engine.stream yields them
        elif ev.type == "tool_call": ...    # ev.name ("python", "browser.search"), ev.text (the code)
        elif ev.type == "tool_result": ...  # ev.text (the output), ev.error, ev.message
        elif ev.type == "done":             # ev.messages: every new message of the turn, in
            history += ev.messages          # order (calls, tool results, the answer)

The harmony side (docs/harmony.md §5.5, §5.10): the system message declares the tools
(Toolbox.declare); when a completion stops on <|call|> to `python` or `browser.*`, the call
is run and its output appended as the tool's message (author python / browser.search,
recipient assistant, the call's channel), and the engine is called again on the longer
conversation, until the model answers or stops for another reason. The output is data: it is
the text of that message, which the renderer encodes as plain text, never as special tokens.
A call to a client function (`functions.*`) ends the turn with stop_reason "tool_call", for
the caller to run, as without built-in tools.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

from openai_harmony import Conversation, Message

from oss_mlx.harmony import tool_result_message
from oss_mlx.tools.toolbox import Toolbox, call_name

MAX_TOOL_CALLS = 32  # per turn: a model that keeps calling is stopped, not looped forever


@dataclass
class ToolEvent:
    type: str  # "tool_call" (about to run) | "tool_result" (ran)
    name: str  # "python", "browser.search", ...
    channel: Optional[str]
    text: str  # tool_call: the code / JSON arguments; tool_result: the output
    message: Optional[Message] = None  # the call message / the tool's message
    error: Optional[str] = None  # tool_result: see ToolResult.error


@dataclass
class TurnDone:
    """The end of the turn. completion: the last engine Completion; stop_reason: its own, or
    "cancelled" when a tool call was interrupted, "tool_call" when the model called a client
    function or MAX_TOOL_CALLS was reached; messages: the turn's new messages, in order."""

    completion: object
    stop_reason: str
    messages: list = field(default_factory=list)
    tool_calls: int = 0
    type: str = "done"
    completions: list = field(default_factory=list)  # every engine Completion of the turn

    def combined(self):
        """One Completion for the whole turn, for a caller that shows or records a turn as one
        answer: the last completion's final text, tokens and stats (its prompt holds the rest),
        the analysis of every completion, the turn's messages and stop reason, and as
        tool_calls only the calls left to the caller (stop_reason "tool_call"): the built-in
        calls that ran are in `messages`, each followed by its result."""
        from dataclasses import replace

        done = self.completions or [self.completion]
        calls = self.completion.tool_calls if self.stop_reason == "tool_call" else []
        return replace(self.completion, messages=list(self.messages), stop_reason=self.stop_reason,
                       analysis="\n".join(c.analysis for c in done if c.analysis),
                       tool_calls=list(calls))


def run_turn(engine, conversation, toolbox: Toolbox, params=None, cancel=None,
             max_tool_calls: int = MAX_TOOL_CALLS, progress=None) -> Iterator:
    """Yield the turn's events (engine delta/message events, ToolEvents), then a TurnDone.
    `progress`: told of each prefill chunk (Engine.stream), when given."""
    base = list(toolbox.declare(conversation).messages)
    new: list[Message] = []
    calls, completions = 0, []
    while True:
        completion = None
        more = {} if progress is None else {"progress": progress}  # engines that take it
        for ev in engine.stream(Conversation.from_messages(base + new), params, cancel, **more):
            if ev.type == "done":
                completion = ev.completion
            else:
                yield ev
        new += completion.messages
        completions.append(completion)
        call = builtin_call(completion)
        if call is None or calls >= max_tool_calls:
            yield TurnDone(completion, completion.stop_reason, new, calls, completions=completions)
            return
        calls += 1
        name = call_name(call.recipient)
        yield ToolEvent("tool_call", name, call.channel, _text(call), call)
        output, error = toolbox.call(call, cancel)
        result = tool_result_message(call.recipient, output, channel=call.channel)
        new.append(result)
        yield ToolEvent("tool_result", name, call.channel, output, result, error)
        if error == "cancelled" or (cancel is not None and cancel.is_set()):
            yield TurnDone(completion, "cancelled", new, calls, completions=completions)
            return


def builtin_call(completion) -> Message | None:
    """The call to run: the last message, when the turn stopped on a call to a built-in tool."""
    if completion.stop_reason != "tool_call" or not completion.messages:
        return None
    last = completion.messages[-1]
    return last if call_name(last.recipient) is not None else None


def _text(message: Message) -> str:
    return "".join(getattr(c, "text", "") for c in message.content)
