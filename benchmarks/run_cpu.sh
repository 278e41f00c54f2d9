#!/usr/bin/env bash
# The figures in benchmarks/results/cpu-*: a 20b-shaped model shortened to 4 layers, on MLX's CPU
# backend (a 2-core Linux box), oss-mlx at its default dtype and at bf16 against mlx-lm.
# Short on purpose (about 10 minutes there); the first run also builds the synthetic checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/cpu-20b-L4.json}
oss-mlx bench --synth 20b --layers 4 --prompt-tokens 128,1024 --gen-tokens 32 --repeat 3 \
  --compare mlx-lm --dtype auto,bfloat16 --json "$out"
python3 benchmarks/plot.py "$out" -o "${out%.json}.png"
