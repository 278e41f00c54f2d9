"""Exact token history: past assistant turns rendered as the tokens the model sampled.

Re-rendering a past assistant message with harmony does not always give back the tokens the
model wrote: it writes a tool call's recipient before the channel (`<|start|>assistant
to=functions.f<|channel|>commentary ...`) where the model may have written it after, and a client
may re-serialise the JSON arguments or the text. Each such difference breaks the prompt's common
prefix with the cached KV state, and the rest of the prompt is prefilled again.

So the engine remembers the tokens of every message it generated, keyed by the message's content
normalised against what clients change (JSON re-serialised, surrounding and repeated whitespace,
the channel of a tool call), and `render` uses them in place of harmony's rendering wherever a
message of the conversation matches one; messages that match nothing keep harmony's rendering.
A message closed by `<|return|>` is stored closed by `<|end|>`, as harmony renders it in history.

    history = TokenHistory(encoding)
    history.remember(prompt[-2:], completion.tokens, closed_messages)   # after each turn
    tokens = history.render(conversation)                               # the next prompt
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

from openai_harmony import Conversation, Message, Role

from oss_mlx.harmony.encoding import CLOSERS, END, RETURN, START, render_kept
from oss_mlx.harmony.messages import drop_finished_analysis, is_tool_call, message_text


def signature(m: Message) -> tuple | None:
    """What identifies an assistant message's content whatever a client did to its form."""
    if m.author.role != Role.ASSISTANT:
        return None
    text = message_text(m)
    if is_tool_call(m.recipient):
        try:
            text = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False)
        except ValueError:
            text = " ".join(text.split())
        return ("call", m.recipient, text)
    kind = "analysis" if m.channel == "analysis" else "say"  # final and preamble alike
    return (kind, " ".join(text.split()))


def split_messages(head: list[int], tokens: list[int]) -> list[list[int]]:
    """The sampled `tokens` of one turn cut into messages as history renders them: each from
    `<|start|>` to its closer (the first one's `<|start|>assistant` is `head`, the prompt's
    end), `<|return|>` written as `<|end|>`."""
    spans, cur = [], list(head)
    for t in tokens:
        if not cur and t != START:
            if t in CLOSERS:
                continue  # a stray closer between messages (e.g. <|end|><|return|>)
            return []  # text outside a message: do not guess
        cur.append(t)
        if t in CLOSERS:
            spans.append(cur[:-1] + [END if t == RETURN else t])
            cur = []
    return spans


class TokenHistory:
    def __init__(self, encoding, max_messages: int = 8192):
        self.encoding = encoding
        self.max_messages = max_messages
        self._known: OrderedDict[tuple, list[int]] = OrderedDict()
        self._lock = threading.Lock()  # the engine's thread remembers, request threads render

    def remember(self, head: list[int], tokens: list[int], messages: list[Message]):
        """Record a turn: `head` the prompt's last tokens (`<|start|>assistant`), `tokens` what
        was sampled, `messages` the messages it closed, in order."""
        if len(head) != 2 or head[0] != START:
            return
        spans = split_messages(head, tokens)
        if len(spans) != len(messages):
            return
        with self._lock:
            for m, span in zip(messages, spans):
                sig = signature(m)
                if sig is not None:
                    self._known[sig] = span
                    self._known.move_to_end(sig)
            while len(self._known) > self.max_messages:
                self._known.popitem(last=False)

    def export(self, tokens: list[int]) -> list:
        """The known messages whose tokens occur in `tokens` (a saved conversation), as JSON."""
        starts: dict[tuple, list[int]] = {}
        for i, t in enumerate(tokens):
            if t == START:
                starts.setdefault(tuple(tokens[i:i + 4]), []).append(i)
        with self._lock:
            items = list(self._known.items())

        def occurs(span, i):  # (the last message's closer is not in a cache's token list)
            return tokens[i:i + len(span)] in (span, span[:-1] if i + len(span) - 1 == len(tokens)
                                               else None)

        return [[list(sig), span] for sig, span in items
                if any(occurs(span, i) for i in starts.get(tuple(span[:4]), ()))]

    def load(self, items: list):
        """Add messages written by `export`."""
        with self._lock:
            for sig, span in items:
                self._known[tuple(sig)] = [int(t) for t in span]

    def render(self, conversation) -> list[int]:
        """Prompt tokens for the next assistant turn, as harmony.render_prompt, with each
        assistant message this engine generated written as it was sampled."""
        messages = (conversation.messages if isinstance(conversation, Conversation)
                    else list(conversation))
        messages = drop_finished_analysis(messages)  # once per prompt: render_kept keeps them
        full = render_kept(self.encoding, messages)
        body = [m for m in messages if m.author.role not in (Role.SYSTEM, Role.DEVELOPER)]
        with self._lock:
            known = {sig: self._known.get(sig) for sig in map(signature, body)}
        if not any(known.values()):
            return full
        parts = [self.encoding.render(m) for m in body]
        n = sum(len(p) for p in parts)
        end = len(full) - 2  # render_prompt ends with <|start|>assistant
        if full[end] != START or full[end - n:end] != [t for p in parts for t in p]:
            return full  # the renderer did not render message by message: keep its rendering
        out = full[: end - n]
        for m, p in zip(body, parts):
            out += known.get(signature(m)) or p
        return out + full[end:]
