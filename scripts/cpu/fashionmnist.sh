#!/usr/bin/env bash
# CPU-scale Random vs PAD on Fashion-MNIST, ConvNetW32, IPC 1 and 10, seeds 0 1 2 (SEEDS=...).
#   bash scripts/cpu/fashionmnist.sh [DATA_DIR]   (default: Debian's dataset-fashion-mnist)
#   IPCS=1 bash scripts/cpu/fashionmnist.sh       (IPC 1 only)
# Outputs in runs/cpu/fashionmnist/. Measured on the 2-core machine (2026-11-25, other jobs
# running, OMP_NUM_THREADS=1): IPCS=1 took 18 min 24 s for 3 seeds (scores and experts included);
# the IPC 10 part 101 min for 3 seeds (each distillation 20-40 min, each evaluation 2-3 min),
# so the whole recipe takes about two hours.
source "$(dirname "$0")/common.sh"
DATA=${1:-$REPO/dataset}
OUT="$REPO/runs/cpu/fashionmnist"
mkdir -p "$OUT"
[ -f "$OUT/FashionMNIST_GraNd.pt" ] || "$PYTHON" buffer/rank_difficulty.py \
  --dataset FashionMNIST --data_path "$DATA" --max_per_class 500 --model ConvNetW32 --epochs 5 \
  --repeat 2 --out "$OUT" --device cpu
experts buffer_cl FashionMNIST ConvNetW32 500 "" --sort_method "$OUT/FashionMNIST_GraNd.pt" \
  --init_ratio 0.75 --add_end_epoch 2 --rm_epoch_first 3 --rm_epoch_second 4 \
  --rm_easy_ratio_first 0.1 --rm_easy_ratio_second 0.2
IPCS=${IPCS:-"1 10"}
for ipc in $IPCS; do
  for seed in $SEEDS; do
    evaluate "random$ipc-s$seed" "$seed" FashionMNIST ConvNetW32 "" --random_ipc "$ipc" --lr_net 0.01
    distill PAD_depth.py "configs/cpu/FashionMNIST_IPC${ipc}_ConvNetW32.yaml" buffer_cl \
      "pad$ipc-s$seed" "$seed"
    evaluate_run "pad$ipc-s$seed" "$seed" FashionMNIST "$ipc" ConvNetW32 ""
  done
done
methods=(); for ipc in $IPCS; do methods+=("random$ipc" "pad$ipc"); done
summary "${methods[@]}" | tee "$OUT/summary.txt"
