#!/usr/bin/env bash
# Shared steps of the paper-scale reproduction scripts (GPU). Sourced, not run.
# Each step is skipped or resumed when its outputs already exist, so a script can be rerun after
# an interruption. Environment knobs: DATA_ROOT (default dataset/), DEVICE (default auto),
# NUM_EXPERTS (default 100), NPROC (torchrun processes for the experts, default 1).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
source scripts/env.sh
DATA_ROOT="${DATA_ROOT:-$REPO/dataset}"
DEVICE="${DEVICE:-auto}"
NUM_EXPERTS="${NUM_EXPERTS:-100}"
NPROC="${NPROC:-1}"

# score DATASET INDEX_NAME [DATA_PATH] [MODEL]: GraNd difficulty file data_indices/<INDEX_NAME>.pt
# (DeepCore's protocol: ResNet18, 40 epochs, 10 repeats; resumes per repeat; Tiny's 64x64
# images need the ResNet18_Tiny variant).
score() {
  local dataset=$1 name=$2 data_path=${3:-$DATA_ROOT} model=${4:-ResNet18}
  if [ -f "data_indices/$name.pt" ]; then echo "have data_indices/$name.pt"; return; fi
  "$PYTHON" buffer/rank_difficulty.py --dataset "$dataset" --data_path "$data_path" \
    --method GraNd --model "$model" --name "$name" --device "$DEVICE"
}

# experts DATASET MODEL INDEX_NAME [DATA_PATH]: 100 curriculum experts with the README's flags.
experts() {
  local dataset=$1 model=$2 sort_method=$3 data_path=${4:-$DATA_ROOT}
  local launcher=("$PYTHON")
  if [ "$NPROC" -gt 1 ]; then launcher=("$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC"); fi
  (cd buffer && "${launcher[@]}" buffer_CL.py --dataset="$dataset" --model="$model" \
    --train_epochs=100 --num_experts="$NUM_EXPERTS" --zca --buffer_path=../buffer_storage/ \
    --data_path="$data_path" --sort_method="$sort_method" --rho_max=0.01 --rho_min=0.01 \
    --alpha=0.3 --lr_teacher=0.01 --mom=0. --batch_train=256 --init_ratio=0.75 \
    --add_end_epoch=20 --rm_epoch_first=40 --rm_epoch_second=60 --rm_easy_ratio_first=0.1 \
    --rm_easy_ratio_second=0.2 --device "$DEVICE")
}

# distill ENTRY CONFIG RUN_NAME [extra --key value ...]: PAD_depth.py or PAD_loss.py from distill/.
# Resumes from the run's checkpoint when there is one.
distill() {
  local entry=$1 config=$2 name=$3; shift 3
  (cd distill && "$PYTHON" "$entry" --cfg "../$config" --name "$name" \
    --data_path "$DATA_PATH_FOR_DISTILL" --device "$DEVICE" \
    --resume "$(resume_flag "$config" "$name")" "$@")
}

resume_flag() {  # true when the run folder of CONFIG/NAME holds a checkpoint
  local config=$1 name=$2
  "$PYTHON" - "$config" "$name" <<'PY'
import sys
from utils.config import load_config
cfg = load_config(sys.argv[1])
from pathlib import Path
run = Path("distill/logged_files") / cfg.dataset / str(cfg.ipc) / cfg.model / sys.argv[2]
print("true" if (run / "checkpoint.pt").exists() else "false")
PY
}

# evaluate DATASET IPC MODEL RUN_NAME EVAL_MODE [extra flags]: 5 fresh networks per model on the
# best saved set of a run.
evaluate() {
  local dataset=$1 ipc=$2 model=$3 name=$4 eval_mode=$5; shift 5
  local run="logged_files/$dataset/$ipc/$model/$name/Normal"
  (cd distill && "$PYTHON" evaluation.py --dataset "$dataset" --model "$model" --zca \
    --data_path "$DATA_PATH_FOR_DISTILL" --data_dir "$run/images_best.pt" \
    --label_dir "$run/labels_best.pt" --lr_dir "$run/lr_best.pt" --num_eval 5 \
    --eval_mode "$eval_mode" --device "$DEVICE" --out "$run/eval_$eval_mode.json" "$@")
}
