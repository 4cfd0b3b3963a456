#!/usr/bin/env bash
# Shared steps of the CPU-scale recipes. Sourced, not run. Every step skips or resumes finished
# work, so a recipe can be rerun after an interruption.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
source scripts/env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # see scripts/quickstart.sh
SEEDS=${SEEDS:-"0 1 2"}
# Extra distillation flags for every run, e.g. DISTILL_FLAGS="--amp bf16" (word-split).
DISTILL_FLAGS=${DISTILL_FLAGS:-}

# experts NAME DATASET MODEL MAX_PER_CLASS ZCA_FLAG [buffer_CL flags...]: 4 experts of 6 epochs.
experts() {
  local name=$1 dataset=$2 model=$3 per_class=$4 zca=$5; shift 5
  "$PYTHON" buffer/buffer_CL.py --dataset "$dataset" --model "$model" --data_path "$DATA" \
    --buffer_path "$OUT/$name" --train_epochs 6 --num_experts 4 --save_interval 4 \
    --max_per_class "$per_class" --rho_max 0.01 --rho_min 0.01 --alpha 0.3 --lr_teacher 0.01 \
    --mom 0 --batch_train 256 --test_every 0 --device cpu $zca "$@"
}

# distill ENTRY CONFIG BUFFER RUN_NAME SEED [--key value ...]
distill() {
  local entry=$1 config=$2 buffer=$3 name=$4 seed=$5; shift 5
  local run="$OUT/logged_files"
  if [ -f "$OUT/.done_$name" ]; then return; fi
  local resume=false
  find "$run" -path "*/$name/checkpoint.pt" 2>/dev/null | grep -q . && resume=true
  "$PYTHON" "distill/$entry" --cfg "$config" --data_path "$DATA" --buffer_path "$OUT/$buffer" \
    --out_dir "$run" --name "$name" --seed "$seed" --resume "$resume" --device cpu "$@" \
    $DISTILL_FLAGS
  touch "$OUT/.done_$name"
}

# evaluate NAME SEED DATASET MODEL ZCA_FLAG [evaluation.py flags...]: 5 networks, 300 epochs.
evaluate() {
  local name=$1 seed=$2 dataset=$3 model=$4 zca=$5; shift 5
  [ -f "$OUT/eval_$name.json" ] && return
  "$PYTHON" distill/evaluation.py --dataset "$dataset" --data_path "$DATA" --model "$model" \
    --num_eval 5 --epoch_eval_train 300 --batch_train 256 --seed "$seed" --device cpu \
    --out "$OUT/eval_$name.json" $zca "$@"
}

# evaluate_run NAME SEED DATASET IPC MODEL ZCA_FLAG: the best set of a distillation run.
evaluate_run() {
  local name=$1 seed=$2 dataset=$3 ipc=$4 model=$5 zca=$6
  local run="$OUT/logged_files/$dataset/$ipc/$model/$name/Normal"
  evaluate "$name" "$seed" "$dataset" "$model" "$zca" --data_dir "$run/images_best.pt" \
    --label_dir "$run/labels_best.pt" --lr_dir "$run/lr_best.pt"
}

# summary METHOD...: mean +- std over seeds of each method's mean accuracy (eval_<method>-s<seed>.json).
summary() {
  "$PYTHON" - "$OUT" "$SEEDS" "$@" <<'PY'
import json, statistics, sys
from pathlib import Path
out, seeds, methods = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3:]
print(f"{'method':14s} {'accuracy % (mean +- std over seeds)':>38s}  per seed")
for method in methods:
    means = []
    for seed in seeds:
        record = json.loads((out / f"eval_{method}-s{seed}.json").read_text())
        means.append(next(iter(record["models"].values()))["mean"])
    std = statistics.pstdev(means) if len(means) > 1 else 0.0
    print(f"{method:14s} {statistics.mean(means):30.2f} +- {std:4.2f}   "
          + " ".join(f"{m:.2f}" for m in means))
PY
}
