"""ScriptedModel: a stand-in for oss_mlx.model.Model that replays exact harmony token streams.

It has the Model API the engine uses (`config.max_context` / `vocab_size` / `sliding_window`,
`make_cache()`, `model(tokens, cache)`, `model.prefill(tokens, cache, chunk_size)`), and real
mlx-lm caches (a RotatingKVCache on even layers, a KVCache on odd ones, fed with dummy keys), but
its logits force the next token of a scripted reply whatever the input. So chat and server tests
run the real engine, sampler and harmony parser on a known stream:

    from support.scripted import ScriptedModel, harmony_tokens   # tests/ is on sys.path under pytest
    from oss_mlx.engine import Engine
    from oss_mlx.harmony import load_encoding

    enc = load_encoding(model_dir)              # or vocab_dir(tmp_path) for a bare vocabulary
    model = ScriptedModel(
        "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Hi!<|return|>",
        encoding=enc,
    )
    engine = Engine(model, enc)
    completion = engine.complete(conversation, SamplingParams(max_tokens=100))
    assert completion.final == "Hi!"
    model.push('<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1}<|call|>')

Each reply is a string (encoded with `encoding`, special tokens allowed) or a list of token ids.
A request starts the next queued reply when the engine begins prefilling it; after the reply's
last token the model forces `after` (default <|return|>), so a reply without a stop token still
ends. A prefill with no reply queued raises AssertionError. `model.at(i, action)` runs `action`
when token i of a reply is about to be produced (to wait on an event, or raise a signal there).
`model.prompts` records, per request, the tokens actually prefilled (with prompt-cache reuse,
only the new suffix), and `model.fed` every token fed one at a time while decoding.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from oss_mlx.config import ModelConfig
from oss_mlx.harmony import RETURN


def harmony_tokens(encoding, text: str) -> list[int]:
    """Token ids of a harmony string written with its special tokens, e.g. "<|channel|>final"."""
    return encoding.encode(text, allowed_special="all")


def vocab_dir(folder) -> Path:
    """A folder holding the genuine o200k_base.tiktoken, from the bpe-openai package (offline)."""
    import importlib.util

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "o200k_base.tiktoken"
    if not target.exists():
        # Located, not imported: importing bpe_openai loads all its vocabularies.
        pkg = importlib.util.find_spec("bpe_openai").submodule_search_locations[0]
        src = Path(pkg) / "data" / "o200k_base.tiktoken.gz"
        with gzip.open(src) as f, open(target.with_suffix(".tmp"), "wb") as g:
            shutil.copyfileobj(f, g)
        target.with_suffix(".tmp").rename(target)
    return folder


def scripted_model_dir(folder) -> Path:
    """`vocab_dir(folder)` marked as a converted model (an oss-mlx config.json with a model
    configuration): what the commands resolve and a scripted engine loads its encoding from."""
    import json

    folder = vocab_dir(folder)
    cfg = {"format": "oss-mlx", "model_type": "gpt_oss", "model": ModelConfig().to_dict()}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


class ScriptedModel:
    def __init__(self, *replies, encoding=None, max_context: int = 4096, sliding_window: int = 8,
                 num_layers: int = 2, vocab_size: int = 201088, after: int = RETURN):
        self.config = ModelConfig(
            num_hidden_layers=num_layers, vocab_size=vocab_size, sliding_window=sliding_window,
            initial_context_length=max_context, rope_scaling_factor=1.0,
        )
        self.encoding = encoding
        self.after = after
        self.queue: list[list[int]] = []
        self.reply: list[int] = []
        self.pos = 0
        self._prompt_cache = None  # the cache of an unfinished prompt (prefilled with logits=False)
        self.prompts: list[list[int]] = []
        self.fed: list[int] = []
        self.hooks: dict = {}
        for r in replies:
            self.push(r)

    def push(self, reply) -> "ScriptedModel":
        """Queue the reply for the next request (a harmony string or a list of token ids)."""
        if isinstance(reply, str):
            if self.encoding is None:
                raise ValueError("ScriptedModel needs encoding= to take string replies")
            reply = harmony_tokens(self.encoding, reply)
        self.queue.append(list(reply))
        return self

    def at(self, index: int, action) -> "ScriptedModel":
        """Call `action()` (once) when the model is about to produce token `index` (0-based) of
        a reply: an explicit synchronisation point in place of a sleep, e.g.
        `model.at(5, event.wait)` holds the request there until the test sets `event`, and
        `model.at(5, lambda: os.kill(os.getpid(), signal.SIGINT))` is a Ctrl-C at token 5."""
        self.hooks[index] = action
        return self

    def make_cache(self):
        return [
            RotatingKVCache(max_size=self.config.sliding_window) if self.config.is_sliding(i)
            else KVCache()
            for i in range(self.config.num_hidden_layers)
        ]

    def _forced(self, batch: int, length: int, tok: int):
        """Logits [B, T, V] that put all the mass on `tok`."""
        row = mx.where(mx.arange(self.config.vocab_size) == tok, 0.0, -1e9)
        return mx.broadcast_to(row, (batch, length, self.config.vocab_size))

    def _next(self) -> int:
        action = self.hooks.pop(self.pos, None)
        if action is not None:
            action()
        tok = self.reply[self.pos] if self.pos < len(self.reply) else self.after
        self.pos += 1
        return tok

    def _update(self, tokens, cache):
        if cache is None:
            return
        B, T = tokens.shape
        kv = tokens.astype(mx.float32).reshape(B, 1, T, 1)  # the token ids stand in for K/V
        for c in cache:
            c.update_and_fetch(kv, kv)

    def __call__(self, tokens, cache=None):
        self._update(tokens, cache)
        self.fed += [int(t) for t in tokens.reshape(-1).tolist()]
        self._prompt_cache = None
        return self._forced(*tokens.shape, self._next())

    def prefill(self, tokens, cache, chunk_size: int = 512, logits: bool = True):
        # The engine prefills a prompt in chunks without logits, then its last token with
        # them: a request starts at a prefill that does not continue an unfinished prompt in
        # the same cache.
        n = tokens.shape[1]
        if cache is None or cache is not self._prompt_cache:
            assert self.queue, "ScriptedModel: a request started with no reply queued (use push())"
            self.reply = self.queue.pop(0)
            self.prompts.append([])
        self._prompt_cache = None if logits else cache
        self.prompts[-1] += [int(t) for t in tokens.reshape(-1).tolist()]
        for i in range(0, n, chunk_size):
            self._update(tokens[:, i : i + chunk_size], cache)
        self.pos = 0
        return self._forced(tokens.shape[0], 1, self._next())[:, -1, :]


# ---- the CLI with a scripted engine, for tests that run chat/generate in a subprocess -------
#
#     python tests/scripted.py chat --model VOCAB_DIR ...     (tests/test_chat.py does this)
#
# runs `oss_mlx.cli.main(argv, load_engine=engine_from_env)`. The test describes the engine in
# the child's environment: SCRIPTED_REPLIES (JSON list of harmony strings: a ScriptedModel
# behind the real Engine; unset: the real model of the folder), SCRIPTED_CONTEXT (the scripted
# model's context, default 4096), SCRIPTED_LOG (a file that gets each prompt the engine is asked
# to complete, decoded, one JSON string a line), SCRIPTED_PAUSE="INDEX:FIFO" (when token INDEX
# of a reply is about to be made, write a line to the FIFO, which the test is blocked reading,
# then wait for SIGINT: the test presses Ctrl-C at a known point, with no sleep).


def pause_at_signal(fifo: str):
    """Tell the test (blocked reading `fifo`) that the model is here, then wait for Ctrl-C."""
    import os
    import signal

    def pause():
        # The process's SIGINT handler (chat's) stays in charge; a wakeup fd learns that it
        # fired, whichever thread the kernel delivered the signal to, and the handler has run
        # by the time this returns (Python runs it at the next bytecode of the main thread).
        r, w = os.pipe()
        os.set_blocking(w, False)
        old = signal.set_wakeup_fd(w)
        try:
            with open(fifo, "w") as f:
                f.write("paused\n")
            while os.read(r, 1) != bytes([signal.SIGINT]):
                pass
        finally:
            signal.set_wakeup_fd(old)
            os.close(r)
            os.close(w)

    return pause


class PausingModel:
    """A real model that runs `action` before the INDEX-th one-token (decode) call of each
    request (a request starts with a prefill)."""

    def __init__(self, model, index: int, action):
        self._model, self._index, self._action, self._calls = model, index, action, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def prefill(self, *args, **kwargs):
        self._calls = 0
        return self._model.prefill(*args, **kwargs)

    def __call__(self, tokens, cache=None):
        if tokens.shape[1] == 1:
            self._calls += 1
            if self._calls == self._index:
                self._action()
        return self._model(tokens, cache)


def engine_from_env(model_dir):
    import json
    import os

    from oss_mlx.engine import Engine
    from oss_mlx.harmony import load_encoding

    log = os.environ.get("SCRIPTED_LOG")
    pause = os.environ.get("SCRIPTED_PAUSE")
    index, _, fifo = pause.partition(":") if pause else (None, None, None)

    class LoggedEngine(Engine):
        def stream(self, conversation, params=None, cancel=None, **kw):
            if log:
                with open(log, "a") as f:
                    f.write(json.dumps(self.encoding.decode(self.render(conversation))) + "\n")
            return super().stream(conversation, params, cancel, **kw)

    if "SCRIPTED_REPLIES" not in os.environ:
        engine = Engine.load(model_dir)
        if pause:
            engine.model = PausingModel(engine.model, int(index), pause_at_signal(fifo))
        return engine
    enc = load_encoding(model_dir)
    model = ScriptedModel(*json.loads(os.environ["SCRIPTED_REPLIES"]), encoding=enc,
                          max_context=int(os.environ.get("SCRIPTED_CONTEXT", "4096")))
    if pause:
        model.at(int(index), pause_at_signal(fifo))
    return LoggedEngine(model, enc)


if __name__ == "__main__":
    import sys

    from oss_mlx.cli import main

    sys.exit(main(sys.argv[1:], load_engine=engine_from_env))
