#!/usr/bin/env bash
# Table 2 of the paper (cross-architecture, GPU scale): evaluate the distilled sets of the large
# settings on ConvNet, ConvNet-BN, ResNet18, ResNet18-BN, VGG11, AlexNet, LeNet, MLP (eval_mode X),
# 5 networks each. Runs table1.sh for the setting first if its distilled set is missing.
#   bash scripts/reproduce/table2.sh CIFAR10 1000   # paper: PAD 86.90 85.67 86.95 88.09 84.34 85.83 67.28 53.62
#   bash scripts/reproduce/table2.sh CIFAR100 100   # paper: PAD 58.50 58.66 58.15 63.17 55.02 55.93 33.87 27.12
#   bash scripts/reproduce/table2.sh Tiny 50        # paper: PAD 41.02 40.88 36.08 42.96 38.64 35.02 13.17 9.68
# Cost (estimate): 8 architectures x 5 networks x 1,000 epochs on the distilled set, several
# GPU-hours at IPC 1000 (ResNet18 and VGG11 dominate).
source "$(dirname "$0")/common.sh"
dataset=${1:?usage: table2.sh DATASET IPC}
ipc=${2:?usage: table2.sh DATASET IPC}
model=ConvNet; data=$DATA_ROOT
[ "$dataset" = Tiny ] && { model=ConvNetD4; data=$DATA_ROOT/tiny-imagenet-200; }
DATA_PATH_FOR_DISTILL=$data
run="distill/logged_files/$dataset/$ipc/$model/table1-depth/Normal"
[ -f "$run/images_best.pt" ] || bash "$(dirname "$0")/table1.sh" "$dataset" "$ipc"
evaluate "$dataset" "$ipc" "$model" table1-depth X
