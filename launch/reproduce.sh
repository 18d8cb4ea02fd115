#!/usr/bin/env bash
# Re-runs the robustness table of docs/RESULTS.md from scratch, offline:
#   1. train: vanilla (--rose_mode none), ROSE-First, ROSE-Second, ROSE-Ensemble, and each of METHODS
#      (--method) alone and with ROSE-Ensemble, each with every seed, through launch/finetune.py on 2
#      DeepSpeed processes at ZeRO-2 (same data, steps and learning rate);
#   2. robustness: clean, AdvGLUE SST-2 and both attacks on each exported model, plus its sharpness
#      (launch/robustness.py evaluate);
#   3. report: the mean +- std table, the loss surfaces and the plots (launch/robustness.py report).
# Finished stages are kept: re-running continues where it stopped. REDUCED=1 is the CI smoke version
# (2 methods, 1 seed, a few steps and examples): it checks that every stage produced its numbers.
#
#   bash launch/reproduce.sh                  # the full table (about 8 hours on 2 CPU cores, evaluation included)
#   OUT=runs/smoke REDUCED=1 bash launch/reproduce.sh
#   LR=1e-4 MODES= SEEDS="2 3" PREVIOUS=docs/robustness/results.json bash launch/reproduce.sh
#                                             # finish the table's seeds 2-3 of the methods on another machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python)}
BIN=$(dirname "$PY")
OUT=${OUT:-runs/robustness}
if [[ "${REDUCED:-0}" == 1 ]]; then
    SEEDS=${SEEDS:-1} MODES=${MODES-"none ensemble"} STEPS=${STEPS:-6} EXAMPLES=${EXAMPLES:-12} LRS=${LRS:-1e-4}
    SURFACE=${SURFACE:-3} EVAL_SAMPLES=${EVAL_SAMPLES:-64} METHODS=${METHODS-"rdrop"}
else
    SEEDS=${SEEDS:-"1 2 3"} MODES=${MODES-"none first second ensemble"} STEPS=${STEPS:-200}
    EXAMPLES=${EXAMPLES:-80} SURFACE=${SURFACE:-7} EVAL_SAMPLES=${EVAL_SAMPLES:-} LRS=${LRS:-"1e-4 3e-4"}
    METHODS=${METHODS-"rdrop r3f childtuning-f childtuning-d"}
fi
# The published SST-2 (RoBERTa-base) `upper` of each variant; one learning rate for all methods, the one
# of LRS whose vanilla run (first seed) has the best clean validation accuracy.
declare -A UPPER=([none]=40 [first]=60 [second]=30 [ensemble]=40)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT/train" "$OUT/select"
start=$(date +%s)

train() {  # train MODE SEED LR DIR [METHOD]
    local run=$4 extra=(--method "${5-none}")
    [[ -f "$run/model.safetensors" && -f "$run/eval_results.json" ]] && return 0
    echo "== train $1 seed $2 lr $3 -> $run"
    [[ -n "$EVAL_SAMPLES" ]] && extra+=(--max_eval_samples "$EVAL_SAMPLES")
    "$BIN/deepspeed" --num_gpus 2 --master_port "${MASTER_PORT:-29597}" launch/finetune.py \
        --deepspeed ds_configs/zero2.json --output_dir "$run" --overwrite_output_dir \
        --rose_mode "$1" --rose_upper "${UPPER[$1]}" --learning_rate "$3" --seed "$2" --max_steps "$STEPS" \
        --warmup_steps $(( STEPS / 10 )) --per_device_train_batch_size 8 --max_seq_length 64 --logging_steps 10 \
        "${extra[@]}" >"$run.log" 2>&1 || { echo "training failed, see $run.log" >&2; tail -5 "$run.log" >&2; exit 1; }
}

first_seed=${SEEDS%% *}
GIVEN_LR=${LR:-}
if [[ -n "$GIVEN_LR" ]]; then  # chosen before (e.g. on another machine): no selection runs
    echo "learning rate: $LR (given)"
else
    for lr in $LRS; do
        train none "$first_seed" "$lr" "$OUT/select/lr$lr"
    done
    LR=$("$PY" -c '
import json, sys
runs = {lr: json.load(open(f"{sys.argv[1]}/select/lr{lr}/eval_results.json"))["eval_accuracy"] for lr in sys.argv[2:]}
print(max(runs, key=lambda lr: (runs[lr], -float(lr))))' "$OUT" $LRS)
    echo "learning rate: $LR (best clean validation accuracy of vanilla, seed $first_seed, among $LRS)"
fi
echo "$LR" > "$OUT/learning_rate"
for seed in $SEEDS; do
    for mode in $MODES; do
        run="$OUT/train/$mode-seed$seed"
        if [[ $mode == none && $seed == "$first_seed" && -z "$GIVEN_LR" && ! -e $run ]]; then
            ln -s "../select/lr$LR" "$run"  # the selection run is this run
        fi
        train "$mode" "$seed" "$LR" "$run"
    done
    for method in $METHODS; do  # each method alone, and with ROSE-Ensemble on top
        train none "$seed" "$LR" "$OUT/train/$method-seed$seed" "$method"
        train ensemble "$seed" "$LR" "$OUT/train/$method+ensemble-seed$seed" "$method"
    done
done
echo "train: $(( $(date +%s) - start )) s"
# one process now: let it use every core
OMP_NUM_THREADS=${EVAL_THREADS:-$(nproc)} "$PY" launch/robustness.py evaluate "$OUT" --examples "$EXAMPLES" --surface "$SURFACE" ${EVAL_SAMPLES:+--eval_samples "$EVAL_SAMPLES"}
"$PY" launch/robustness.py report "$OUT" ${PREVIOUS:+--previous "$PREVIOUS"}
echo "total: $(( $(date +%s) - start )) s"
