#!/usr/bin/env bash
# CPU-scale comparison on the CIFAR-10 copy, ConvNetW32, IPC 1, seeds 0 1 2 (SEEDS=...):
#   Random (1 real image per class), DATM (plain experts, no mask), PAD depth (curriculum experts
#   + depth mask) and PAD loss (curriculum experts + loss mask), with the same expert budget
#   (4 experts x 6 epochs on the first 500 images per class) and the same 200 iterations.
#   bash scripts/cpu/cifar10_ipc1.sh [DATA_DIR]     (default ~/.cache/pad-data/cifar10)
# Outputs in runs/cpu/cifar10_ipc1/. Measured on the 2-core machine (2026-11-25, OMP_NUM_THREADS=1,
# a Fashion-MNIST recipe and benchmarks running beside it): 69 minutes in all: scoring 36 s, each
# set of 4 experts about 4 minutes, each distillation 4-7 minutes, each 5-network evaluation
# under 1 minute.
source "$(dirname "$0")/common.sh"
DATA=${1:-$HOME/.cache/pad-data/cifar10}
OUT="$REPO/runs/cpu/cifar10_ipc1"
CONFIG=configs/cpu/CIFAR10_IPC1_ConvNetW32.yaml
mkdir -p "$OUT"
[ -f "$OUT/CIFAR10_GraNd.pt" ] || "$PYTHON" buffer/rank_difficulty.py --dataset CIFAR10 \
  --data_path "$DATA" --zca --max_per_class 500 --model ConvNetW32 --epochs 5 --repeat 2 \
  --out "$OUT" --device cpu
experts buffer_plain CIFAR10 ConvNetW32 500 --zca
experts buffer_cl CIFAR10 ConvNetW32 500 --zca --sort_method "$OUT/CIFAR10_GraNd.pt" \
  --init_ratio 0.75 --add_end_epoch 2 --rm_epoch_first 3 --rm_epoch_second 4 \
  --rm_easy_ratio_first 0.1 --rm_easy_ratio_second 0.2
for seed in $SEEDS; do
  evaluate "random-s$seed" "$seed" CIFAR10 ConvNetW32 --zca --random_ipc 1 --lr_net 0.01
  distill PAD_depth.py "$CONFIG" buffer_plain "datm-s$seed" "$seed" --depth_ratio 0
  distill PAD_depth.py "$CONFIG" buffer_cl "pad_depth-s$seed" "$seed"
  distill PAD_loss.py "$CONFIG" buffer_cl "pad_loss-s$seed" "$seed"
  for method in datm pad_depth pad_loss; do
    evaluate_run "$method-s$seed" "$seed" CIFAR10 1 ConvNetW32 --zca
  done
done
summary random datm pad_depth pad_loss | tee "$OUT/summary.txt"
