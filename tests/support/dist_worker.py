"""One rank of the distributed tests (tests/test_distributed.py starts it under mlx.launch).

    python tests/dist_worker.py MODEL_DIR OUT_DIR MOE

Every rank loads its float32 share of MODEL_DIR and writes OUT_DIR/rank{R}.json (the bytes it
read, its greedy tokens); rank 0 also writes OUT_DIR/logits.npz: the full-sequence logits, the
prefill's last logits and those of each token then fed one at a time (past the sliding window).
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from oss_mlx.engine.distributed import init, load_sharded
from oss_mlx.engine import SamplingParams

TOKENS = [5, 17, 300, 2000, 9, 11, 42, 7, 100, 1000, 3, 4, 88, 12, 900, 31, 64, 128, 7, 5]
PREFILL = 12
GREEDY_PROMPT = [200006, 17360, 200008, 12, 5, 33, 200007, 200006, 173781]


def main(folder, out, moe):
    group = init()
    engine, sharding = load_sharded(folder, mx.float32, group, moe)
    model = engine.model
    # Every rank evaluates the same graphs in the same order: each holds collectives.
    full = model(mx.array([TOKENS[:PREFILL]]))[0]
    mx.eval(full)
    cache = model.make_cache()
    steps = [model.prefill(mx.array([TOKENS[:PREFILL]]), cache, chunk_size=5)[0]]
    for t in TOKENS[PREFILL:]:
        mx.eval(steps[-1])
        steps.append(model(mx.array([[t]]), cache)[0, -1])
    mx.eval(steps)
    greedy = engine.complete(GREEDY_PROMPT, SamplingParams(temperature=0, max_tokens=12)).tokens
    out = Path(out)
    if group.rank() == 0:
        np.savez(out / "logits.npz", full=np.array(full), steps=np.array(mx.stack(steps)))
    report = {"rank": group.rank(), "size": group.size(), "bytes_read": sharding.bytes_read,
              "greedy": greedy, "comm_calls": sharding.comm.calls}
    (out / f"rank{group.rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:4])
