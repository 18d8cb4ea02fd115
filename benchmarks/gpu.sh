#!/usr/bin/env bash
# The benchmarks on ONE GPU, for when a GPU machine is lent (never needed by tests or CI):
# 1. the billion-parameter proof of benchmarks/scale.py: a 1.006B-parameter Llama-shaped decoder through
#    launch/finetune.py at ZeRO-3 in bf16 without offload (the GPU holds it all), ROSE-Ensemble 3 steps,
#    a checkpoint, a resumed 4th step and the export, then ROSE-Second and vanilla for the step times;
# 2. the benchmark table of benchmarks/run.py: bf16, fused Adam kernels in vanilla and ROSE alike, a
#    BERT-style model of 1.03B parameters (hidden 2048, 20 layers) at ZeRO 0/2/3 on 1 rank, peak
#    accelerator memory instead of RSS, selection bytes at world size 1 (2 and 4 need more GPUs).
# Planned to finish within 10 minutes on an H100/H200. Writes benchmarks/results/gpu.{json,png} (the
# scale run under "scale") and refreshes benchmarks/RESULTS.md. Extra arguments go to benchmarks/run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/run.py --device gpu --tag gpu --nproc 1 --worlds 1 --dtype bf16 --fused \
    --hidden 2048 --layers 20 --seq 128 --batch 8 --rounds 20 --warmup 3 \
    --sizes 1024x20 2048x20 --memory_stages 2 3 "$@"
DS_ACCELERATOR=cuda python benchmarks/scale.py --nproc 1 --deepspeed ds_configs/zero3.json --seq 256 \
    --work runs/scale-gpu --json benchmarks/results/gpu_scale.json --into benchmarks/results/gpu.json
