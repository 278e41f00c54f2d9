"""One model turn with function tools, as `serve` runs it: the prompt through the public
harmony API, the engine's own grammar constraint on tool arguments (constrain.request_spec and
constrain.processor, the calls serve's Service.constraint makes), and what came back."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from oss_mlx.errors import OssMlxError


def constraint_spec(tools: list, on: bool = True):
    """The Spec constraining each tool's arguments to its schema (empty when `on` is False or
    there are no tools). tools: objects with name, parameters, strict (functions.ToolSchema)."""
    if not on or not tools:
        return None
    from oss_mlx.server.constraints import request_spec

    spec, _ = request_spec(None, "tools", tools, True)
    return spec


def processors(engine, spec) -> list:
    """A fresh logits processor per turn: it follows one turn's harmony stream."""
    from oss_mlx.harmony.constrain import processor

    return [processor(engine.encoding, spec)] if spec else []


@dataclass
class Turn:
    """What one request produced. stop: the engine's stop reason, or "context" when the prompt
    did not fit (error says so). output: the sampled tokens as harmony text."""

    stop: str
    calls: list = field(default_factory=list)
    final: str = ""
    commentary: str = ""
    messages: list = field(default_factory=list)
    output: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    wall_s: float = 0.0
    error: str = ""

    def to_dict(self) -> dict:
        """The figures and the parsed result (the raw output is kept beside it)."""
        return {"stop": self.stop, "calls": self.calls, "final": self.final,
                "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "generated_tokens": self.generated_tokens,
                "wall_s": round(self.wall_s, 4), "error": self.error}


def run_turn(engine, conversation, settings, spec, key: str | None = None) -> Turn:
    """One request through `engine`; a prompt longer than the context is a Turn with stop
    "context", not an exception (one case too long must not end a whole run)."""
    t0 = time.perf_counter()
    params = settings.sampling(processors(engine, spec))
    try:
        c = engine.complete(conversation, params, key=key)
    except OssMlxError as e:
        if "context" not in str(e):
            raise
        return Turn(stop="context", error=str(e), wall_s=time.perf_counter() - t0)
    calls = [{"name": k["name"], "arguments": k["arguments"], "recipient": k["recipient"],
              "channel": k["channel"]} for k in c.tool_calls]
    return Turn(stop=c.stop_reason, calls=calls, final=c.final, commentary=c.commentary,
                messages=list(c.messages), output=engine.encoding.decode(c.tokens),
                prompt_tokens=c.stats.prompt_tokens, cached_tokens=c.stats.cached_tokens,
                generated_tokens=c.stats.generated_tokens, wall_s=time.perf_counter() - t0)


_MARKUP = re.compile(r"to=functions\.|<\|call\|>|<\|constrain\|>|\bfunctions\.\w+")


def looks_like_call(text: str, names) -> bool:
    """Whether a text answer holds a tool call written as text (the call landed in content):
    harmony call markup, or a declared tool's name followed by its arguments."""
    if not text:
        return False
    if _MARKUP.search(text):
        return True
    return any(re.search(rf"\b{re.escape(n)}\s*[({{]", text) for n in names)
