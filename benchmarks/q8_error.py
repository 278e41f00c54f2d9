"""The logit error of 8-bit dense weights (`convert --dense-bits 8`) against bf16 dense ones,
same experts, same prompt, every position of one forward pass:

    oss-mlx synth 20b-L4-ck --preset 20b --layers 4
    oss-mlx convert 20b-L4-ck -o 20b-L4 && oss-mlx convert 20b-L4-ck -o 20b-L4-q8 --dense-bits 8
    python benchmarks/q8_error.py 20b-L4 20b-L4-q8 --tokens 64

Prints (and with --json writes) the max and mean absolute logit difference, the relative RMS
error, the KL divergence of the softmaxes (bf16 || q8) and how often the greedy token agrees.
"""

from __future__ import annotations

import argparse
import json
import sys

import mlx.core as mx
import numpy as np

from oss_mlx.model import load


def logits(folder, tokens: int, seed: int, chunk: int) -> np.ndarray:
    model = load(folder)
    ids = np.random.default_rng(seed).integers(0, min(200000, model.config.vocab_size), (1, tokens))
    cache = model.make_cache()
    rows = []
    for s in range(0, ids.shape[1], chunk):
        out = model(mx.array(ids[:, s : s + chunk]), cache=cache).astype(mx.float32)
        rows.append(np.array(out[0]))
    del model
    mx.clear_cache()
    return np.concatenate(rows)


def compare(ref: np.ndarray, q8: np.ndarray) -> dict:
    def log_softmax(a):
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref.astype(np.float64)), log_softmax(q8.astype(np.float64))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    d = np.abs(ref - q8)
    return {
        "positions": int(ref.shape[0]),
        "max_abs": float(d.max()), "mean_abs": float(d.mean()),
        "rel_rms": float(np.sqrt(((ref - q8) ** 2).mean() / (ref**2).mean())),
        "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
        "argmax_agree": float((ref.argmax(-1) == q8.argmax(-1)).mean()),
        "logit_std": float(ref.std()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bf16")
    ap.add_argument("q8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = compare(logits(args.bf16, args.tokens, args.seed, args.chunk),
                  logits(args.q8, args.tokens, args.seed, args.chunk))
    out.update(bf16=args.bf16, q8=args.q8, tokens=args.tokens, seed=args.seed)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
