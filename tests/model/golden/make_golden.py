"""Regenerate the golden logits in this folder from Hugging Face transformers' GptOssForCausalLM.

    pip install torch==2.13.0          # only to regenerate; the tests need neither torch nor transformers
    python tests/golden/make_golden.py

For each case: synthesise the tiny checkpoint (HF layout, fixed seed) with `oss_mlx.convert.synth`,
load it in transformers with the MXFP4 experts dequantized (`Mxfp4Config(dequantize=True)`), in
float32, with eager attention (the path with the correct 8-key window and the sinks), run one
forward over a fixed 70-token sequence, and store the logits of a fixed subset of vocabulary ids
at every position plus the full-vocabulary argmax. The HF model's YaRN must be the unrounded one
(`truncate: false`); it is checked below, as is agreement with tests/reference.py.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import GptOssForCausalLM, Mxfp4Config

from oss_mlx.convert.synth import synth

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from support import reference  # noqa: E402

CASES = {"tiny-seed0": dict(seed=0, layers=4), "tiny-seed1-3layers": dict(seed=1, layers=3)}
T = 70
N_VOCAB_IDS = 512


def make(name: str, seed: int, layers: int, tmp: Path) -> None:
    src = synth(tmp / name, preset="tiny", layout="hf", seed=seed, layers=layers)
    model = GptOssForCausalLM.from_pretrained(
        src, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    cfg = model.config
    assert cfg._attn_implementation == "eager"
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["truncate"] is False
    assert cfg.sliding_window == 8 and cfg.num_hidden_layers == layers
    assert cfg.layer_types[0] == "sliding_attention"
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.float32  # dequantized, not the mxfp4 kernel path
    assert float(model.model.layers[0].self_attn.sinks.detach().abs().sum()) > 0

    vocab = cfg.vocab_size
    ids = np.random.default_rng(100 + seed).integers(0, vocab, T)
    with torch.no_grad():
        logits = model(torch.tensor(ids)[None]).logits[0].float().numpy()
    vocab_ids = np.sort(np.random.default_rng(7).choice(vocab, N_VOCAB_IDS, replace=False))

    # The two oracles must agree with each other before either is trusted.
    conf, weights = reference.load_checkpoint(src)
    ref = reference.forward(conf, weights, ids)
    err = float(np.abs(ref - logits).max())
    print(f"{name}: max |HF - numpy reference| = {err:.2e}, logits std {logits.std():.2f}")
    assert err < 1e-3, err

    meta = dict(seed=seed, layers=layers, preset="tiny", layout="hf", tokens=T,
                transformers=transformers.__version__, torch=torch.__version__,
                max_abs_err_vs_numpy_reference=err, weights_sha256=reference.fingerprint(src))
    np.savez_compressed(
        HERE / f"{name}.npz", ids=ids, vocab_ids=vocab_ids,
        logits=logits[:, vocab_ids].astype(np.float32), argmax=logits.argmax(-1),
        meta=np.array(json.dumps(meta)),
    )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in CASES.items():
            make(name, **case, tmp=Path(tmp))
