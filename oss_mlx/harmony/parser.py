"""The streaming parser of one assistant turn: sampled tokens in, events and a Completion out.

    parser = TurnParser(encoding)          # the prompt ended with <|start|>assistant
    reason = parser.feed(token)            # None, or why the turn ended ("stop", "tool_call",
                                           # "malformed")
    events = parser.drain()                # Event("delta" | "message", ...) since the last drain
    completion = parser.finish(reason)     # text per channel, tool calls, messages, tokens

Lenient where the model is sloppy but the meaning is clear (a message with no header before its
stop token, a stray <|end|> or stop token between messages); everything else that breaks the
grammar ends the turn as "malformed", keeping what was parsed (docs/harmony.md §5.2, §5.6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from openai_harmony import HarmonyError, Message, Role, StreamableParser, StreamState

from oss_mlx.harmony.encoding import CALL, CLOSERS, END, ENDOFTEXT, MESSAGE, START, STOPS
from oss_mlx.harmony.messages import function_name, is_tool_call, message_text


@dataclass
class Completion:
    """What one assistant turn produced.

    analysis / final: the text on those channels (several messages joined by a newline; a message
    with no channel, e.g. a bare refusal, counts as final). commentary: user-visible preambles
    (commentary without a recipient). tool_calls: [{"name": "get_weather", "recipient":
    "functions.get_weather", "arguments": '<JSON text as the model wrote it>', "channel":
    "commentary", "content_type": "<|constrain|>json"}] for each finished message to a recipient.
    messages: the finished openai_harmony.Messages, ready to append to the history, plus, when the
    turn was cut (length/context/cancelled/malformed), the unfinished final-channel message (an
    unfinished analysis or tool call is left out). tokens: the sampled token ids, stop token
    included.
    """

    analysis: str = ""
    final: str = ""
    commentary: str = ""
    tool_calls: list = field(default_factory=list)
    messages: list = field(default_factory=list)
    stop_reason: str = "stop"
    stats: Any = None  # the engine's Stats of the request that produced it
    tokens: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """The `oss-mlx generate --json` object."""
        return {
            "analysis": self.analysis,
            "final": self.final,
            "tool_calls": [dict(c) for c in self.tool_calls],
            "stop_reason": self.stop_reason,
            "stats": self.stats.to_dict() if self.stats is not None else None,
            "tokens": list(self.tokens),
        }


@dataclass
class Event:
    """One event of a streamed turn: "delta" (new text of the open message: channel, recipient,
    text; never a special token), "message" (a message closed: `message`, and its whole text),
    "done" (always last, exactly once: `completion`)."""

    type: str  # "delta" | "message" | "done"
    channel: Optional[str] = None
    recipient: Optional[str] = None
    text: str = ""
    message: Optional[Message] = None
    completion: Optional[Completion] = None


class TurnParser:
    """Feeds one assistant turn's sampled tokens to harmony's StreamableParser and turns them
    into events (docs/harmony.md §5.5): `feed(token)` returns a stop reason when the turn ends,
    `drain()` the events so far, `finish(stop_reason)` the Completion.

    Lenient where the model is sloppy but the meaning is clear (a message with no header before
    its stop token, a stray <|end|> or stop token between messages); everything else that breaks
    the grammar ends the turn as "malformed", keeping what was parsed.
    """

    def __init__(self, encoding):
        self.enc = encoding
        self.parser = StreamableParser(encoding, Role.ASSISTANT, strict=False)
        self.tokens: list[int] = []
        self.events: list[Event] = []
        self.done: list[Message] = []  # finished messages
        self.streamed = ""  # text of the current message already sent as deltas
        # The parser's state, tracked here: StreamableParser.state serialises the whole current
        # message, which would make each token cost O(message length).
        self.state = StreamState.HEADER  # the prompt ended with <|start|>assistant

    def drain(self):
        events, self.events = self.events, []
        return events

    def _close(self) -> bool:
        """Record the message the parser just closed; False if it closed none."""
        messages = self.parser.messages
        if len(messages) <= len(self.done):
            return False
        msg = messages[-1]
        text = message_text(msg)
        if len(text) > len(self.streamed) and text.startswith(self.streamed):
            # e.g. a header-less message: its text only appears when it closes.
            self.events.append(Event("delta", msg.channel, msg.recipient, text[len(self.streamed):]))
        self.streamed = ""
        self.done.append(msg)
        self.events.append(Event("message", msg.channel, msg.recipient, text, message=msg))
        return True

    def feed(self, tok: int) -> Optional[str]:
        """Process one sampled token; returns a stop reason when the turn ends."""
        self.tokens.append(tok)
        state = self.state
        if tok in STOPS or tok == ENDOFTEXT:
            if state == StreamState.EXPECT_START:
                # A stop right after <|end|>: the turn is complete (seen as HTTP 500s elsewhere).
                return "stop"
            if tok == ENDOFTEXT:
                # Not a harmony stop token, but the end of text: close what is open.
                if state != StreamState.CONTENT or not self._eos():
                    return "malformed"
                return "stop"
            if not self._process(tok) or not self._close():
                return "malformed"
            return "tool_call" if tok == CALL and is_tool_call(self.done[-1].recipient) else "stop"
        if state == StreamState.EXPECT_START:
            if tok == END:
                return None  # a doubled <|end|>: nothing to close
            if tok != START:
                return "malformed"
        if state == StreamState.CONTENT and tok != END and self.enc.is_special_token(tok):
            return "malformed"  # a control token inside a message: never leak it as text
        if not self._process(tok):
            return "malformed"
        if state != StreamState.EXPECT_START and self.state == StreamState.EXPECT_START:
            self._close()
        elif self.state == StreamState.CONTENT:
            delta = self.parser.last_content_delta
            if delta:
                self.streamed += delta
                self.events.append(
                    Event("delta", self.parser.current_channel, self.parser.current_recipient, delta)
                )
        return None

    def _process(self, tok) -> bool:
        try:
            self.parser.process(tok)
        except HarmonyError:
            return False
        if self.state == StreamState.EXPECT_START:
            self.state = StreamState.HEADER  # only <|start|> gets here
        elif tok in CLOSERS:
            self.state = StreamState.EXPECT_START
        elif tok == MESSAGE and self.state == StreamState.HEADER:
            self.state = StreamState.CONTENT
        return True

    def _eos(self) -> bool:
        try:
            self.parser.process_eos()
        except HarmonyError:
            return False
        self.state = StreamState.EXPECT_START
        return self._close()

    def finish(self, stop_reason: str, stats=None) -> Completion:
        messages = list(self.done)
        partial = None
        if stop_reason not in ("stop", "tool_call"):
            try:
                if self.state == StreamState.CONTENT and self.parser.current_content:
                    partial = Message.from_role_and_content(Role.ASSISTANT, self.parser.current_content)
                    partial.channel = self.parser.current_channel
                    partial.recipient = self.parser.current_recipient
                    partial.content_type = self.parser.current_content_type
            except HarmonyError:  # pragma: no cover - parser left in a broken state
                partial = None
        texts = {"analysis": [], "final": [], "commentary": []}
        calls = []
        for m in messages + ([partial] if partial is not None else []):
            if m.author.role != Role.ASSISTANT:
                continue
            text = message_text(m)
            if is_tool_call(m.recipient):
                if m is not partial:
                    calls.append({
                        "name": function_name(m.recipient) or m.recipient,
                        "recipient": m.recipient,
                        "arguments": text,
                        "channel": m.channel,
                        "content_type": m.content_type,
                    })
            elif m.channel in (None, "final"):
                texts["final"].append(text)
            elif m.channel in texts:
                texts[m.channel].append(text)
        if partial is not None and partial.channel in (None, "final") and not is_tool_call(partial.recipient):
            messages.append(partial.with_channel("final"))
        return Completion(
            analysis="\n".join(texts["analysis"]),
            final="\n".join(texts["final"]),
            commentary="\n".join(texts["commentary"]),
            tool_calls=calls,
            messages=messages,
            stop_reason=stop_reason,
            stats=stats,
            tokens=list(self.tokens),
        )
