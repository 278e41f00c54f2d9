"""Count the kernels one decode token launches, as a GPU would run them (`oss-mlx bench --ops`).

How it counts:

1. The runtime prefills a short prompt for real, then ONE decode step (the token in, the next
   greedy token out, i.e. the forward, the unembedding and the argmax) is built lazily, never
   evaluated, and its graph written with `mx.export_to_dot`. Every primitive node of that graph is
   one kernel, except the view-only primitives in VIEWS (reshape, transpose, slice, broadcast,
   ...), which launch nothing on a GPU.
2. Each `mx.fast` call (rms_norm, layer_norm, rope, scaled_dot_product_attention) counts once.
   MLX's CPU backend expands them into their fallback graphs (a dozen primitives for one norm),
   a GPU runs each as one kernel; so while the graph is built, `mx.fast.*` are replaced by an
   opaque stand-in with the same output shape and dtype: one `Depends` node (on a constant
   placeholder) over all of the call's inputs. Each Depends node is one "fast" kernel.
3. Each fused region of an `mx.compile`d function is one `Compiled...` primitive in the graph and
   counts once; what compile does not fuse (matmuls, reductions, gathers, fast calls) counts
   one each, exactly as the compiled function runs.
4. Per layer = (count with all L layers - count with the first L - 2 layers) / 2: a sliding and
   a full layer, averaged; the rest (embedding, final norm, unembedding, argmax, masks) is
   "outside" = total - L x per layer.

Known approximations: a reshape of a non-contiguous array copies (one kernel) on a GPU, it is
counted as a view here (in single-token decode the transposed axes have length 1, so MLX's
reshape does not copy); `Concatenate` counts one though MLX launches one copy per input.

The stand-ins poison the traces `mx.compile` caches, so counting runs in a fresh subprocess
(`count_in_subprocess`), never in a process that will evaluate the model afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

VIEWS = frozenset({
    "Reshape", "Transpose", "Slice", "Broadcast", "BroadcastAxes", "ExpandDims", "Squeeze",
    "AsStrided", "Flatten", "Unflatten", "StopGradient", "Split", "View",
})
FAST = ("rms_norm", "layer_norm", "rope", "scaled_dot_product_attention")


# ---- the stand-ins for mx.fast ---------------------------------------------------------------


def _arrays(obj):
    import mlx.core as mx

    if isinstance(obj, mx.array):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [a for o in obj for a in _arrays(o)]
    if isinstance(obj, dict):
        return [a for o in obj.values() for a in _arrays(o)]
    return []


def _opaque(fn):
    import mlx.core as mx
    import numpy as np

    def stand_in(*args, **kwargs):
        real = fn(*args, **kwargs)  # lazily built, never reached from the step's outputs
        placeholder = mx.array(np.zeros(real.shape, np.float32), dtype=real.dtype)
        return mx.depends([placeholder], _arrays(list(args) + list(kwargs.values())))[0]

    return stand_in


@contextlib.contextmanager
def fast_as_one_kernel():
    import mlx.core as mx

    saved = {name: getattr(mx.fast, name) for name in FAST}
    try:
        for name, fn in saved.items():
            setattr(mx.fast, name, _opaque(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(mx.fast, name, fn)


# ---- counting a graph --------------------------------------------------------------------------

_PRIMITIVE = re.compile(r'^\{ (\d+) \[label ="([^"]+)"')


def kernel_kind(label: str) -> str | None:
    """The kernel a primitive node stands for, None for a view."""
    if label in VIEWS:
        return None
    if label == "Depends":
        return "fast"
    if label.startswith("Compiled"):
        return "Compiled"
    return label


def count_graph(outputs, dot_path=None) -> Counter:
    """Kernels in the lazy graph of `outputs`, by kind (views left out)."""
    import mlx.core as mx

    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *_arrays(outputs))
        text = f.read()
    if dot_path:
        Path(dot_path).write_text(text)
    kinds = Counter()
    if True:
        for line in text.splitlines():
            m = _PRIMITIVE.match(line)
            if m and (kind := kernel_kind(m.group(2))) is not None:
                kinds[kind] += 1
    return kinds


# ---- one decode step of a runtime ------------------------------------------------------------


def _layer_list(model):
    """(owner, attribute) of the list of blocks: ours `model.layers`, mlx-lm `model.model.layers`."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), list):
        return inner, "layers"
    return model, "layers"


@contextlib.contextmanager
def first_layers(model, n: int):
    owner, attr = _layer_list(model)
    full = getattr(owner, attr)
    setattr(owner, attr, full[:n])
    try:
        yield
    finally:
        setattr(owner, attr, full)


def step_kernels(rt, n_prompt: int = 16, dot_path=None) -> Counter:
    """Kernels of one greedy decode step after an `n_prompt`-token prefill (caches non-empty)."""
    import mlx.core as mx

    cache = rt.make_cache()
    prompt = mx.array([[(7 * i + 3) % rt.config.vocab_size for i in range(n_prompt)]], dtype=mx.int32)
    y = mx.argmax(rt.prefill(prompt, cache, 512), axis=-1)
    # Two steps past the caches' first growth after a prefill (mlx-lm's rotating cache grows
    # then), so that the step counted is a steady-state one. Ours take the plain path here:
    # the compiled step must be traced for the first time under the stand-ins below.
    warm = (lambda t, c: rt.model(t, cache=c)[:, -1]) if rt.name == "oss-mlx" else rt.step
    for _ in range(2):
        y = mx.argmax(warm(y[:, None], cache), axis=-1)
        mx.eval(y, [c.state for c in cache])
    with fast_as_one_kernel():
        nxt = mx.argmax(rt.step(y[:, None], cache), axis=-1)
        return count_graph(nxt, dot_path)


def count_runtime(rt, n_prompt: int = 16) -> dict:
    """Total, per layer and outside the layers, with the kinds of a layer's kernels."""
    L = rt.config.num_hidden_layers
    total = step_kernels(rt, n_prompt)
    if L > 2:
        with first_layers(rt.model, L - 2):
            fewer = step_kernels(rt, n_prompt)
        per_layer = {k: (total[k] - fewer[k]) / 2 for k in total}
    else:  # too few layers to difference: attribute everything to the layers
        per_layer = {k: v / L for k, v in total.items()}
    per_layer = {k: v for k, v in per_layer.items() if v}
    n_layer = sum(per_layer.values())
    return {
        "runtime": rt.label, "layers": L, "total": sum(total.values()),
        "per_layer": n_layer, "outside_layers": sum(total.values()) - L * n_layer,
        "per_layer_kinds": dict(sorted(per_layer.items(), key=lambda kv: -kv[1])),
        "total_kinds": dict(total.most_common()),
    }


# ---- the subprocess ---------------------------------------------------------------------------


def count_in_subprocess(model: str, dtypes: list[str], source: str | None = None,
                        expert_dtype: str | None = None, decode: str = "both",
                        mlx_lm_dtype: str = "auto", timeout: float = 1800) -> list[dict]:
    """Run the counts in a fresh interpreter (see the module docstring) and return them."""
    from oss_mlx.errors import OssMlxError

    cmd = [sys.executable, "-m", "oss_mlx.bench.opcount", "--model", str(model), "--dtype",
           ",".join(dtypes), "--decode", decode, "--mlx-lm-dtype", mlx_lm_dtype]
    if source:
        cmd += ["--source", str(source)]
    if expert_dtype:
        cmd += ["--expert-dtype", expert_dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise OssMlxError(f"kernel count failed: {tail[0]}")
    return json.loads(proc.stdout)


def main(argv=None) -> int:
    from oss_mlx.bench import harness as bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--source", help="upstream checkpoint: also count mlx-lm on it")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--expert-dtype", help="oss-mlx experts' activation dtype (default: the model's rule)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--decode", default="both", choices=["compiled", "plain", "both"])
    ap.add_argument("--mlx-lm-dtype", default="auto")
    args = ap.parse_args(argv)
    out = []
    for d in args.dtype.split(","):
        rt = bench.load_ours(args.model, d.strip(), expert_dtype=args.expert_dtype,
                             decode="plain" if args.decode == "plain" else "compiled")
        variants = [rt] + ([bench.plain_variant(rt)] if args.decode == "both" else [])
        out.extend(count_runtime(v, args.prompt_tokens) for v in variants)
    if args.source:
        lm = bench.load_mlx_lm(Path(args.source), args.mlx_lm_dtype)
        out.append(count_runtime(lm, args.prompt_tokens))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
