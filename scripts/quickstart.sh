#!/usr/bin/env bash
# The whole PAD method at CPU scale, in one command (about 10 minutes on a 2-core machine):
# difficulty scores -> a few curriculum experts -> PAD distillation at IPC 1 -> evaluation of the
# distilled set next to the Random baseline (IPC 1 real images), with a summary table.
#
#   bash scripts/quickstart.sh                                   # Fashion-MNIST (no download needed
#                                                                # where Debian's package installs)
#   bash scripts/quickstart.sh --dataset CIFAR10 --data_path DIR # CIFAR-10 (torchvision files or
#                                                                # the ImageFolder copy in DIR)
#   bash scripts/quickstart.sh --method DM                       # distribution matching instead
#                                                                # (DC, DSA: gradient matching)
# Options: --out DIR (default runs/quickstart/<DATASET>, <DATASET>-<METHOD> for DC/DSA/DM),
# --device auto|cpu|cuda|cuda:N, --method PAD|DC|DSA|DM (default PAD).
# A rerun after an interruption reuses every finished stage and resumes the distillation.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
fail() { echo "error: $*" >&2; exit 2; }

dataset=FashionMNIST data_path="" out="" device=auto method=PAD
# value FLAG ARGS...: the value after FLAG, or one clear line when there is none.
value() {
  local example=DIR
  case "$1" in --dataset) example=CIFAR10 ;; --device) example=cpu ;; --method) example=DM ;; esac
  [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || fail "$1 needs a value (e.g. $1 $example)"
  printf '%s' "$2"
}
while [ $# -gt 0 ]; do
  case "$1" in
    --dataset|--data_path|--out|--device|--method)
      v=$(value "$@") || exit 2
      case "$1" in
        --dataset) dataset=$v ;; --data_path) data_path=$v ;; --out) out=$v ;; --device) device=$v ;;
        --method) method=$v ;;
      esac
      shift 2 ;;
    --dataset=*) dataset=${1#*=}; shift ;;
    --data_path=*) data_path=${1#*=}; shift ;;
    --out=*) out=${1#*=}; shift ;;
    --device=*) device=${1#*=}; shift ;;
    --method=*) method=${1#*=}; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) fail "unknown option $1 (expected --dataset, --data_path, --out, --device, --method)" ;;
  esac
done
case "$dataset" in
  FashionMNIST) config=configs/cpu/quickstart_FashionMNIST.yaml zca=() ;;
  CIFAR10) config=configs/cpu/quickstart_CIFAR10.yaml zca=(--zca) ;;
  *) fail "unknown data set '$dataset' for the quickstart: expected FashionMNIST or CIFAR10" ;;
esac
case "$method" in
  PAD) suffix="" ;;
  DC|DSA|DM) suffix="-$method" ;;
  *) fail "unknown method '$method' for the quickstart: expected PAD, DC, DSA or DM" ;;
esac
out=${out:-$REPO/runs/quickstart/$dataset$suffix}
[ "$method" = PAD ] || zca=()  # gradient and distribution matching use the plain images
mkdir -p "$out" 2>/dev/null && [ -w "$out" ] \
  || fail "cannot write to the output folder '$out': choose another with --out DIR"
out="$(cd "$out" && pwd)"

# The data: a folder given by the user, else what this machine has or can get.
if [ -z "$data_path" ]; then
  data_path="$out/data"
  if [ "$dataset" = FashionMNIST ] && [ ! -d /usr/share/datasets/fashion-mnist ] \
      && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's dataset-fashion-mnist package" >&2
    { apt-get install -y -qq dataset-fashion-mnist || { apt-get update -qq \
        && apt-get install -y -qq dataset-fashion-mnist; }; } >/dev/null 2>&1 || true
  fi
  if [ "$dataset" = CIFAR10 ]; then
    shared_copy="$REPO/../shared/datasets/cifar10-jpeg.tar.gz"
    if [ ! -d "$data_path/train" ] && [ -f "$shared_copy" ]; then
      mkdir -p "$data_path" && tar xzf "$shared_copy" -C "$data_path"
    fi
  fi
fi
[ -e "$data_path" ] || [ "$data_path" = "$out/data" ] \
  || fail "data folder '$data_path' does not exist: give the folder that holds the $dataset files"

cd "$REPO"
source scripts/env.sh
# One thread per process: at this scale two OpenMP threads gain little, and when anything else
# runs on a 2-core machine they spin against it (measured here: an evaluation took 294 s with 2
# threads against 20 s with 1 while another process was busy).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
times="$out/stage_seconds.tsv"
# stage NAME COMMAND...: runs once; a finished stage leaves a marker and is skipped on a rerun.
stage() {
  local name=$1; shift
  if [ -f "$out/.done_$name" ]; then echo "== $name: done before, reused"; return; fi
  echo "== $name"
  local start=$SECONDS status=0
  "$@" || status=$?
  [ $status -eq 0 ] || exit $status
  printf '%s\t%s\n' "$name" $((SECONDS - start)) >> "$times"
  touch "$out/.done_$name"
}

if [ "$method" != PAD ]; then
  # Gradient or distribution matching (docs/gm_dm.md): no experts; the distilled set has hard
  # labels and is evaluated with the fixed rate lr_net 0.01, beside the same Random baseline.
  entry=DC; [ "$method" = DM ] && entry=DM
  run_dir="$out/logged_files/$dataset/1/ConvNetW32/quickstart/Normal"
  stage distill "$PYTHON" "distill/$entry.py" \
    --cfg "configs/cpu/gm_dm/FashionMNIST_IPC1_$method.yaml" --dataset "$dataset" \
    --data_path "$data_path" --out_dir "$out/logged_files" --name quickstart \
    --device "$device" --resume true
  lr_args=(--lr_net 0.01)
else
stage scores "$PYTHON" buffer/rank_difficulty.py --dataset "$dataset" --data_path "$data_path" \
  --method GraNd --model ConvNetW32 --epochs 3 --repeat 1 --batch 128 --max_per_class 300 \
  --out "$out/data_indices" --device "$device" "${zca[@]}"

stage experts "$PYTHON" buffer/buffer_CL.py --dataset "$dataset" --model ConvNetW32 \
  --train_epochs 6 --num_experts 3 --save_interval 3 --buffer_path "$out/buffer_storage" \
  --data_path "$data_path" --sort_method "$out/data_indices/${dataset}_GraNd.pt" \
  --rho_max 0.01 --rho_min 0.01 --alpha 0.3 --lr_teacher 0.01 --mom 0 --batch_train 256 \
  --init_ratio 0.75 --add_end_epoch 2 --rm_epoch_first 3 --rm_epoch_second 4 \
  --rm_easy_ratio_first 0.1 --rm_easy_ratio_second 0.2 --max_per_class 300 --test_every 0 \
  --device "$device" "${zca[@]}"

run_dir="$out/logged_files/$dataset/1/ConvNetW32/quickstart/Normal"
# --resume true in every case: it continues from the checkpoint, or starts from iteration 0 when
# the folder is new or a run stopped before its first checkpoint.
stage distill "$PYTHON" distill/PAD_depth.py --cfg "$config" --data_path "$data_path" \
  --buffer_path "$out/buffer_storage" --out_dir "$out/logged_files" --name quickstart \
  --device "$device" --resume true
lr_args=(--lr_dir "$run_dir/lr_best.pt")
fi

stage eval_random "$PYTHON" distill/evaluation.py --dataset "$dataset" --data_path "$data_path" \
  --model ConvNetW32 --random_ipc 1 --lr_net 0.01 --num_eval 5 --epoch_eval_train 300 \
  --batch_train 256 --out "$out/eval_random.json" --device "$device" "${zca[@]}"

stage eval_pad "$PYTHON" distill/evaluation.py --dataset "$dataset" --data_path "$data_path" \
  --model ConvNetW32 --data_dir "$run_dir/images_best.pt" --label_dir "$run_dir/labels_best.pt" \
  "${lr_args[@]}" --num_eval 5 --epoch_eval_train 300 --batch_train 256 \
  --out "$out/eval_pad.json" --device "$device" "${zca[@]}"

"$PYTHON" - "$out" "$run_dir" "$method" <<'PY'
import json
import sys
from pathlib import Path

out, run_dir, method = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
def result(name):
    record = json.loads((out / f"eval_{name}.json").read_text())
    model = next(iter(record["models"].values()))
    return model["mean"], model["std"], len(model["accs"])
print()
print(f"{'set (IPC 1, ConvNetW32)':28s} {'test accuracy %':>18s}")
for label, name in [("Random real images", "random"), (f"{method} distilled", "pad")]:
    mean, std, n = result(name)
    print(f"{label:28s} {mean:10.2f} +- {std:4.2f}  ({n} networks)")
print()
print("seconds per stage:")
for line in (out / "stage_seconds.tsv").read_text().splitlines():
    name, seconds = line.split("\t")
    print(f"  {name:12s} {int(seconds):6d}")
import shutil

grids = sorted(run_dir.parent.glob("images_[0-9]*.png"), key=lambda p: int(p.stem.split("_")[1]))
if grids:
    shutil.copyfile(grids[-1], out / "distilled_images.png")
    print(f"\ndistilled images: {out / 'distilled_images.png'} (a copy of {grids[-1].name})")
    print(f"loss curve: {run_dir.parent / 'loss.png'}")
PY
