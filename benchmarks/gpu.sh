#!/usr/bin/env bash
# The benchmark table on ONE GPU, for when a GPU machine is lent: bf16, fused Adam kernels in vanilla and
# ROSE alike, a BERT-style model of 1.03B parameters (hidden 2048, 20 layers) at ZeRO 0/2/3 on 1 rank,
# peak accelerator memory instead of RSS, selection bytes at world size 1 (2 and 4 need more GPUs).
# Planned to finish within 10 minutes on an H100/H200. Writes benchmarks/results/gpu.{json,png} and
# refreshes benchmarks/RESULTS.md. Extra arguments go to benchmarks/run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/run.py --device gpu --tag gpu --nproc 1 --worlds 1 --dtype bf16 --fused \
    --hidden 2048 --layers 20 --seq 128 --batch 8 --rounds 20 --warmup 3 \
    --sizes 1024x20 2048x20 --memory_stages 2 3 "$@"
