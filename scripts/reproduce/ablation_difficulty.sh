#!/usr/bin/env bash
# Ablation "filtering information extraction" (paper Fig. 3 / README 3.png, GPU scale): experts
# trained on CIFAR-10 with a fixed share of the easiest (REMOVE=easy) or hardest (REMOVE=hard)
# images left out, ratios 5-50 %, then DATM-style distillation (no parameter mask) at IPC 1 and 500.
# Paper (approximate, read from the plot): IPC500 83.5 -> ~84.3 with 10 % easy removed;
# IPC1 46.4 -> ~47.6 with 20 % hard removed.
# Cost (estimate): one 100-expert buffer per ratio (~5-15 GPU-hours each) plus two distillations.
#   REMOVE=easy bash scripts/reproduce/ablation_difficulty.sh
source "$(dirname "$0")/common.sh"
remove=${REMOVE:-easy}
DATA_PATH_FOR_DISTILL=$DATA_ROOT
score CIFAR10 CIFAR10_GraNd
for ratio in 0.05 0.1 0.2 0.3 0.5; do
  buffer="../buffer_storage/remove_${remove}_$ratio/"
  (cd buffer && "$PYTHON" buffer_CL.py --dataset=CIFAR10 --model=ConvNet --train_epochs=100 \
    --num_experts="$NUM_EXPERTS" --zca --buffer_path="$buffer" --data_path="$DATA_ROOT" \
    --sort_method=CIFAR10_GraNd --rho_max=0.01 --rho_min=0.01 --alpha=0.3 --lr_teacher=0.01 \
    --mom=0. --batch_train=256 --remove_"$remove"="$ratio" --device "$DEVICE")
  for ipc in 1 500; do
    distill PAD_depth.py "configs/CIFAR-10/ConvIN/IPC$ipc.yaml" "remove-$remove-$ratio" \
      --buffer_path "$buffer" --depth_ratio 0
    evaluate CIFAR10 "$ipc" ConvNet "remove-$remove-$ratio" S
  done
done
