"""From engine events to what an OpenAI client sees: one assistant reply, its finish reason, the
pieces of the wire format both APIs share (ids, SSE lines, usage objects).

A `Reply` is fed the engine's events and returns the pieces to send: reasoning text, user text,
a tool call starting, its arguments arriving. Both the Chat Completions and the Responses
routes build their own wire objects from these pieces.

Finish reasons (Chat `finish_reason`; Responses `status` and `incomplete_details.reason`):
  a finished tool call         -> "tool_calls"      | completed
  <|return|> or a stop string  -> "stop"            | completed
  max tokens or a full context -> "length"          | incomplete, "max_output_tokens"
  the model broke the harmony format (a stray control token, a bad header): what it wrote
  before is kept, and the reply says so ->
                                  "content_filter"  | incomplete, "content_filter"
  ("content_filter" is the one value both APIs' types have for "the output was cut for a
  reason other than length": here the server cut the malformed tail.)
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from oss_mlx.harmony import function_name, section_of
from oss_mlx.server.conversation import Tool, find_tool

log = logging.getLogger("oss_mlx.server")


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"{head}data: {body}\n\n"


def chat_usage(prompt: int, completion: int, cached: int, reasoning: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def responses_usage(prompt: int, completion: int, cached: int, reasoning: int) -> dict:
    # cache_write_tokens: the prompt tokens this request added to the prompt cache (all that
    # were not read from it).
    return {"input_tokens": prompt, "output_tokens": completion,
            "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": cached,
                                     "cache_write_tokens": prompt - cached},
            "output_tokens_details": {"reasoning_tokens": reasoning}}


class StopFilter:
    """Cuts text at the first `stop` string, holding back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.buf, self.hit = stops, "", False

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return text
        self.buf += text
        cuts = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            out, self.buf, self.hit = self.buf[: min(cuts)], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out, self.buf = self.buf[: len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        return out


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""
    done: bool = False  # its harmony message closed (<|call|>); False when cut off
    kind: str = "function"  # the declared tool's kind: function, custom, local_shell
    namespace: str | None = None  # a Responses namespace other than `functions`


def new_call(recipient: str, tools: list[Tool]) -> ToolCall:
    """A call to `recipient`; one to a tool we did not declare is still a call, not text."""
    tool = find_tool(tools, recipient)
    if tool is None:
        return ToolCall(new_id("call_"), function_name(recipient) or recipient)
    namespace = None if tool.namespace == "functions" else tool.namespace
    return ToolCall(new_id("call_"), tool.name, kind=tool.kind, namespace=namespace)


@dataclass
class Reply:
    """One assistant reply as the client sees it, built from engine deltas.

    `feed` returns the pieces to stream: ("reasoning", text), ("content", text),
    ("tool_call", ToolCall) when a call starts, ("arguments", text) as its JSON arrives.
    `tools`: the declared tools, to route a call to its name, namespace and kind.
    """

    stops: list[str] = field(default_factory=list)
    tools: list[Tool] = field(default_factory=list)
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning_tokens: int = 0
    completion: Any = None
    error: str | None = None  # why the reply failed or was cut after its status was sent
    _filter: StopFilter = None
    _open_call: bool = False

    def __post_init__(self):
        self._filter = StopFilter(self.stops)

    @property
    def stopped(self) -> bool:
        return self._filter.hit

    def feed(self, ev) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        section = section_of(ev.channel, ev.recipient) if ev.type == "delta" else None
        if section is not None:
            if section == "tool":
                if not self._open_call:
                    call = new_call(ev.recipient, self.tools)
                    self.tool_calls.append(call)
                    self._open_call = True
                    out.append(("tool_call", call))
                self.tool_calls[-1].arguments += ev.text
                out.append(("arguments", ev.text))
            elif section == "reasoning":
                self.reasoning_tokens += 1
                self.reasoning += ev.text
                out.append(("reasoning", ev.text))
            elif section == "answer":  # final, or a commentary preamble: both for the user
                text = self._filter.feed(ev.text)
                if text:
                    self.content += text
                    out.append(("content", text))
        elif ev.type == "message":
            if self._open_call:
                self.tool_calls[-1].done = True
            self._open_call = False
        elif ev.type == "done":
            self.completion = ev.completion
            if ev.completion.stop_reason == "malformed":
                log.warning("the model broke the harmony format; the reply ends as "
                            "finish_reason content_filter / status incomplete")
            text = self._filter.flush()
            if text:
                self.content += text
                out.append(("content", text))
        return out

    @property
    def calls(self) -> list[ToolCall]:
        """The tool calls the model finished (one cut off by max_tokens is not a call)."""
        return [c for c in self.tool_calls if c.done]

    @property
    def finish_reason(self) -> str:
        """The Chat finish_reason (see the module docstring)."""
        reason = self.completion.stop_reason if self.completion else "stop"
        if self.calls:
            return "tool_calls"
        if self.stopped:
            return "stop"
        if reason in ("length", "context"):
            return "length"
        if reason == "malformed":
            return "content_filter"
        return "stop"

    @property
    def incomplete_reason(self) -> str | None:
        """The Responses incomplete_details.reason, None when the response is complete."""
        return {"length": "max_output_tokens",
                "content_filter": "content_filter"}.get(self.finish_reason)

    def usage(self, fmt):
        s = self.completion.stats
        return fmt(s.prompt_tokens, s.generated_tokens, s.cached_tokens, self.reasoning_tokens)
