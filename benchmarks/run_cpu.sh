#!/usr/bin/env bash
# The figures in benchmarks/results/cpu-*: gpt-oss-20b shapes cut to 2 layers, on MLX's CPU
# backend (a 2-core x86 Linux machine), oss-mlx at its default dtype (float32 there) and at bf16
# against mlx-lm. Kept short because on this backend an mxfp4 expert matmul with bf16
# activations costs ~150 ms per token and expert: mlx-lm prefills ~1 token/s here, so a
# 1024-token prompt would take a quarter of an hour per run. About 20 minutes in all; the first
# run also builds the synthetic checkpoint (~1 minute, 6 GB in ~/.cache/oss-mlx/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/cpu-20b-L2.json}
oss-mlx bench --synth 20b --layers 2 --prompt-tokens 16,128 --gen-tokens 32 --repeat 2 \
  --compare mlx-lm --dtype auto,float32 --json "$out" | tee "${out%.json}.txt"
oss-mlx bench --plot "${out%.json}.png" --from "$out"
# Where a decode step goes, per component (explains the ratios).
python3 benchmarks/profile_decode.py --synth 20b --layers 2 --dtype auto,float32 --steps 3 \
  --json "${out%.json}-profile.json" | tee "${out%.json}-profile.txt"
