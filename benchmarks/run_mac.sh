#!/usr/bin/env bash
# The full-size figures on an Apple Silicon Mac (Metal): gpt-oss-20b shapes at 128, 4k and 32k
# tokens of context against mlx-lm, then the plot. 20b needs ~16 GB of free memory for the two
# runtimes together (~12 GB each would be the peak alone); 120b (RUN_120B=1) needs ~128 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
chip=$(sysctl -n machdep.cpu.brand_string | tr ' ' '-' | tr 'A-Z' 'a-z')
mkdir -p benchmarks/results
oss-mlx bench --synth 20b --prompt-tokens 128,4096,32768 --gen-tokens 128 --repeat 3 \
  --compare mlx-lm --json "benchmarks/results/$chip-20b.json"
if [ "${RUN_120B:-0}" = 1 ]; then
  oss-mlx bench --synth 120b --prompt-tokens 128,4096,32768 --gen-tokens 128 --repeat 3 \
    --compare mlx-lm --json "benchmarks/results/$chip-120b.json"
fi
oss-mlx bench --plot "benchmarks/results/$chip.png" --from benchmarks/results/$chip-*.json
