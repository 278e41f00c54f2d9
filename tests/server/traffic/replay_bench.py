"""Replay a recorded agent session (tests/server/traffic/NAME.json) on a real converted model, its
replies forced token by token, through the real server: per request the prompt, the cached
tokens and the time to first token. Run it on two checkouts to compare their engines:

    oss-mlx synth 20b-L4-ck --preset 20b --layers 4 && oss-mlx convert 20b-L4-ck -o 20b-L4
    python tests/server/traffic/replay_bench.py --model 20b-L4 --session codex
    PYTHONPATH=OTHER_CHECKOUT python tests/server/traffic/replay_bench.py --model 20b-L4 --session codex
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from test_agent_traffic import load, replay  # noqa: E402

from oss_mlx.engine import Engine  # noqa: E402
from oss_mlx.harmony import RETURN, load_encoding  # noqa: E402


class ForcedReplies:
    """A real model whose sampled tokens are forced to the queued replies (the K/V are real)."""

    def __init__(self, inner, encoding):
        self.inner, self.encoding = inner, encoding
        self.config, self.dtype, self.model_dir = inner.config, inner.dtype, inner.model_dir
        self.queue, self.script, self.n = [], [], 0

    def push(self, reply: str):
        self.queue.append(self.encoding.encode(reply, allowed_special="all"))

    def make_cache(self):
        return self.inner.make_cache()

    def _force(self, logits):
        tok = self.script[self.n] if self.n < len(self.script) else RETURN
        self.n += 1
        return mx.broadcast_to(mx.where(mx.arange(logits.shape[-1]) == tok, 100.0, -100.0),
                               logits.shape)

    def prefill(self, tokens, cache, chunk_size=512, logits=True):
        out = self.inner.prefill(tokens, cache, chunk_size, logits=logits)
        if not logits:
            return out
        self.script, self.n = self.queue.pop(0), 0
        return self._force(out)

    def __call__(self, tokens, cache=None):
        return self._force(self.inner(tokens, cache))


def main() -> int:
    import oss_mlx.engine as engine_module
    from oss_mlx.model import load as load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--session", default="codex")
    p.add_argument("--requests", type=int, default=None, help="only the first N requests")
    args = p.parse_args()
    enc = load_encoding(args.model)
    engine = Engine(ForcedReplies(load_model(args.model), enc), enc)
    session = load(args.session)
    n = args.requests or len(session["requests"])
    session = {**session, "requests": session["requests"][:n], "replies": session["replies"][:n]}
    rows = replay(session, engine)
    print(f"engine: {engine_module.__file__}; model {args.model}; session {args.session}")
    print("request  prompt  cached  prefilled  ttft_s")
    for i, r in enumerate(rows):
        print(f"{i:7d}  {r['prompt']:6d}  {r['cached']:6d}  {r['prompt'] - r['cached']:9d}  "
              f"{r['ttft']:6.2f}")
    total = sum(r["prompt"] - r["cached"] for r in rows)
    print(f"total prefilled {total} tokens, total TTFT {sum(r['ttft'] for r in rows):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
