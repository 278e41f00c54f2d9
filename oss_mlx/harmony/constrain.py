"""Grammar-constrained decoding: structured outputs and tool arguments that always parse.

    from oss_mlx.harmony import constrain

    spec = constrain.Spec(final={"type": "object", ...},                  # response_format
                          tools={"functions.get_weather": {...}})         # each tool's parameters
    params.logits_processors.append(constrain.processor(engine.encoding, spec))

The processor is an mlx-lm style logits processor, `processor(tokens, logits) -> logits`, with
`tokens` the tokens sampled so far in this turn. It follows the harmony stream itself (header,
then content, docs/harmony.md §5.5) and masks the logits only inside two kinds of message:

- the **final** channel, when the request asked for a structured answer: the text must match
  `spec.final` and the message can only close with `<|return|>` (the end of the turn; `<|end|>`
  would let a second final message follow, which the engine would join to the first);
- a message **to a declared tool** (`to=functions.NAME`, on whatever channel, with or without
  `<|constrain|>json`): the arguments must match that tool's JSON schema and the message can only
  close with `<|call|>`.

Objects are written with their properties in the schema's order (as OpenAI's structured outputs
do); between two JSON tokens at most one space (no newline, no run: `_JSON_OPTIONS`). Everything
else (the analysis channel, preambles, the headers themselves) is free, so the model still
reasons first and chooses whether to call a tool. Once the grammar is complete only the
closing token is allowed; while it may still go on (a number), both are.

The grammar library is llguidance (chosen by measurement, see benchmarks/constrain_libs.py: on
the 201,088-token o200k vocabulary it compiles a schema in 1-2 ms, computes a mask in ~0.03 ms a
token, and refuses the keywords it does not implement by name instead of ignoring them). The
mask is a bitmask llguidance writes into a numpy buffer, expanded and applied with MLX. Outside
a constrained message the processor only reads the new token (no mask work).

Schemas are checked when the request arrives (`compile_schema`): a keyword the library does not
implement is an `UnsupportedSchema` naming it (the server answers 400). Tool schemas are compiled
leniently (unimplemented keywords ignored, the rest enforced) unless the tool says `strict`:
agents send schemas written for other servers, and refusing them would break the client.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from oss_mlx.harmony.encoding import CALL, CLOSERS, ENDOFTEXT, MESSAGE, RETURN, START
from oss_mlx.harmony.messages import is_tool_call
from oss_mlx.checkpoint.vocab import O200K_PATTERN, O200K_SIZE
from oss_mlx.errors import OssMlxError

log = logging.getLogger("oss_mlx.constrain")

# The o200k pre-tokenizer pattern: llguidance uses it only to tokenize forced text, never to
# decide a mask. O200K_SIZE: ids below it are o200k's byte-pair tokens, the rest are specials.
N_VOCAB = 201088
N_BYTE_TOKENS = O200K_SIZE
# llguidance marks "the grammar may end here" with its EOS bit; we give it <|endoftext|>, which
# the grammar can never produce as text, and translate that bit into the message's closing token.
_GRAMMAR_EOS = ENDOFTEXT

# JSON as the model writes it: compact (`{"a":1}`, as harmony's tool calls are) or with single
# spaces (`{"a": 1, "b": 2}`, as json.dumps writes), never a run of whitespace or a newline: a
# model that would rather pad than close can write at most one space between two JSON tokens.
# (A run of up to 40 blanks at every such point, the earlier pattern, let a confused model spend
# a whole max_tokens budget on them.) The text inside strings is the schema's business.
_JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": r"\x20?"}
JSON_OBJECT = {"type": "object"}  # response_format {"type": "json_object"}


class UnsupportedSchema(OssMlxError):
    """A schema the grammar library cannot enforce; `keyword` names the offending keyword."""

    def __init__(self, message: str, keyword: str | None = None):
        super().__init__(message)
        self.keyword = keyword


@dataclass
class Spec:
    """What to constrain in one turn, as compiled grammars (`Spec.build` compiles schemas).

    final_grammar: the grammar of the final answer (None: free text). tools: recipient
    ("functions.NAME") -> the grammar of its arguments (a recipient not in it is free).
    """

    final_grammar: Optional[str] = None
    tools: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.final_grammar is not None or bool(self.tools)

    @classmethod
    def build(cls, final: dict | None = None, tools: dict | None = None) -> "Spec":
        """final: a schema; tools: recipient -> (schema or None, strict)."""
        final_grammar = compile_schema(final, "schema") if final is not None else None
        return cls(final_grammar, tool_grammars(tools or {}))


# ---- schemas -> grammars ----------------------------------------------------------------------


def _llguidance():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a dependency of the package
        raise OssMlxError("structured outputs need the llguidance package: pip install llguidance") from None
    return llguidance


_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[([^\]]*)\]')


def compile_schema(schema, where: str, lenient: bool = False) -> str:
    """The llguidance grammar for a JSON schema; UnsupportedSchema when it cannot be enforced.

    where: the request field, for the message ("response_format.json_schema.schema").
    lenient: ignore keywords the library does not implement (the rest is still enforced).
    """
    ll = _llguidance()
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"{where}: a JSON schema must be an object, got {type(schema).__name__}")
    options = {**_JSON_OPTIONS, "lenient": lenient}
    try:
        grammar = ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=options)
    except (ValueError, TypeError) as e:
        raise UnsupportedSchema(f"{where}: not a usable JSON schema: {e}") from None
    err = ll.LLMatcher.validate_grammar(grammar)
    if err:
        m = _UNIMPLEMENTED.search(err)
        if m:
            keys = [k.strip().strip('"') for k in m.group(1).split(",") if k.strip()]
            keyword = keys[0] if keys else None
            raise UnsupportedSchema(
                f"{where}: unsupported JSON Schema keyword {', '.join(repr(k) for k in keys)}: "
                "structured outputs cannot enforce it; remove it from the schema", keyword)
        raise UnsupportedSchema(f"{where}: the schema cannot be enforced: {' '.join(err.split())[:300]}")
    return grammar


def tool_grammars(tools: dict) -> dict:
    """recipient -> grammar, for tools given as recipient -> (parameters schema or None, strict).

    A tool with no parameters takes a JSON object. A lenient schema that still fails (not a
    schema at all) leaves that tool unconstrained, logged; a strict tool's failure is raised.
    """
    out = {}
    for recipient, (schema, strict) in tools.items():
        where = f"tools[{recipient.removeprefix('functions.')}].parameters"
        try:
            out[recipient] = compiled_schema(json.dumps(schema or JSON_OBJECT), where,
                                       not strict)
        except UnsupportedSchema as e:
            if strict:
                raise
            log.warning("not constraining the arguments of %s: %s", recipient, e)
    return out


# ---- the tokenizer ------------------------------------------------------------------------------

_tok_lock = threading.Lock()


def tokenizer(encoding):
    """llguidance's view of the harmony vocabulary (about a second to build; cached)."""
    with _tok_lock:
        return _tokenizer(encoding)


@functools.lru_cache(maxsize=4)
def _tokenizer(encoding):
    ll = _llguidance()
    # openai_harmony exposes no bytes decoder on HarmonyEncoding itself; its inner Rust object has
    # one (a token's raw bytes, which a UTF-8 decode would mangle for partial characters).
    decode_bytes = encoding._inner.decode_bytes
    ranks = {decode_bytes([i]): i for i in range(N_BYTE_TOKENS)}
    specials = {encoding.decode([i]): i for i in range(N_BYTE_TOKENS, N_VOCAB)}
    return ll.LLTokenizer.from_tiktoken(encoder=ranks, special_tokens=specials,
                                        pattern=O200K_PATTERN, eos_token=_GRAMMAR_EOS,
                                        n_vocab=N_VOCAB)


# ---- the logits processor -----------------------------------------------------------------------

_HEADER, _CONTENT, _CONSTRAINED, _BETWEEN = range(4)
_CHANNEL = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


def processor(encoding, spec: Spec) -> "HarmonyConstraint":
    return HarmonyConstraint(encoding, spec)


class HarmonyConstraint:
    """Follows one assistant turn's harmony stream and masks the constrained messages' logits.

    One instance per turn: it starts in the header of the first message (the prompt ends with
    `<|start|>assistant`) and reads each new token once. (Given the prompt's tokens too, as
    mlx-lm's generate_step passes them, it walks through the prompt's messages to the same
    state.)

    Reading a token waits for the device to produce it, which stalls the engine's pipelining
    (the next step is queued before the last token is read). So outside a constrained message
    the processor reads only when a constrained one could have begun: a message needs
    `<|start|>`, a header token and `<|message|>` before its first content token, so from free
    content it skips two calls and reads on the third (`_lookahead`).
    """

    def __init__(self, encoding, spec: Spec):
        self.encoding = encoding
        self.spec = spec
        self.state = _HEADER
        self.header: list[int] = []
        self.matcher = None
        self.closer: Optional[int] = None
        self.seen = 0  # tokens of `tokens` already read
        self.read_at = 0  # the next call with at least this many tokens must read them
        self.words = np.zeros((N_VOCAB + 31) // 32, dtype=np.int32)

    def __call__(self, tokens, logits):
        n = len(tokens)
        if n < self.read_at:
            return logits  # no constrained message can have begun yet: do not wait for tokens
        if n > self.seen:
            for t in tokens[self.seen:].tolist():
                self._feed(int(t))
            self.seen = n
        self.read_at = n + self._lookahead()
        if self.state != _CONSTRAINED:
            return logits
        return self._mask(logits)

    def _lookahead(self) -> int:
        """The fewest tokens after which a constrained message's content could be next."""
        if self.state == _HEADER:
            return 1 if self.header else 2  # <|message|>; a header token and <|message|>
        if self.state == _CONSTRAINED:
            return 1
        return 3  # <|start|> (after <|end|>, or straight from sloppy content), header, <|message|>

    # -- the harmony stream --

    def _feed(self, t: int):
        if self.state == _CONSTRAINED:
            if t == self.closer or t in CLOSERS:
                self.matcher = None
                self.state = _BETWEEN
            elif not self.matcher.consume_token(t):
                # Only possible if something after us picked a masked token: stop constraining.
                log.warning("constraint lost: %s", self.matcher.get_error())
                self.matcher, self.state = None, _CONTENT
            return
        if t == START:
            self.state, self.header = _HEADER, []
        elif t in CLOSERS:
            self.state = _BETWEEN
        elif self.state == _HEADER:
            if t == MESSAGE:
                self._open()
            else:
                self.header.append(t)

    def _open(self):
        """The header is complete: constrain this message if the spec covers it."""
        text = self.encoding.decode(self.header)
        self.header = []
        recipient = _RECIPIENT.search(text)
        channel = _CHANNEL.search(text)
        grammar = closer = None
        if recipient and is_tool_call(recipient.group(1)):
            grammar, closer = self.spec.tools.get(recipient.group(1)), CALL
        elif channel and channel.group(1) == "final":
            grammar, closer = self.spec.final_grammar, RETURN
        if grammar is None:
            self.state = _CONTENT
            return
        # The tokenizer is fetched here, in the engine's thread: building it (once per process)
        # never blocks the server's event loop.
        self.matcher = _llguidance().LLMatcher(tokenizer(self.encoding), grammar, log_level=0)
        self.closer = closer
        self.state = _CONSTRAINED

    # -- the mask --

    def _mask(self, logits):
        m, words = self.matcher, self.words
        bits = words.view(np.uint32)
        eos = np.uint32(1 << (_GRAMMAR_EOS & 31))
        if m.is_stopped():
            bits[:] = 0  # the grammar is complete: only the closing token
            may_end = True
        else:
            m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            may_end = bool(bits[_GRAMMAR_EOS >> 5] & eos)
            bits[_GRAMMAR_EOS >> 5] &= ~eos
        if may_end:
            bits[self.closer >> 5] |= np.uint32(1 << (self.closer & 31))
        return apply_bitmask(logits, words)


@functools.lru_cache(maxsize=1)
def _shifts():
    import mlx.core as mx

    return mx.arange(32, dtype=mx.int32)


def apply_bitmask(logits, words: np.ndarray):
    """logits [..., V] with every token whose bit is 0 in `words` (int32, 32 tokens a word) set
    to -inf; tokens past the bitmask's end (a model vocabulary wider than 201,088) too."""
    import mlx.core as mx

    v = logits.shape[-1]
    bits = (mx.array(words)[:, None] >> _shifts()) & 1
    allowed = bits.reshape(-1).astype(mx.bool_)
    n = allowed.shape[0]
    if n > v:
        allowed = allowed[:v]
    elif n < v:
        allowed = mx.concatenate([allowed, mx.zeros((v - n,), dtype=mx.bool_)])
    return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


@functools.lru_cache(maxsize=512)
def compiled_schema(schema_json: str, where: str, lenient: bool) -> str:
    # Agents send the same tool schemas with every request: compile each once.
    return compile_schema(json.loads(schema_json), where, lenient)
