#!/usr/bin/env bash
# Ablation "filtering information embedding" (paper Fig. 4 / README 4.png, GPU scale): PAD_depth.py
# on CIFAR-10 at IPC 10 and 500 with depth_ratio 0, 0.25, 0.5, 0.75 (the share of the flattened
# parameter vector, shallow layers first, left out of the matching loss).
# Paper (read from the plot, approximate): IPC10 66.8 / ~67.2 / - / ~65.5; IPC500 83.5 -> ~84.4 at 0.75.
# Cost (estimate): 8 distillations of 10,000 iterations, tens of GPU-hours in all.
source "$(dirname "$0")/common.sh"
DATA_PATH_FOR_DISTILL=$DATA_ROOT
score CIFAR10 CIFAR10_GraNd
experts CIFAR10 ConvNet CIFAR10_GraNd
for ipc in 10 500; do
  for ratio in 0 0.25 0.5 0.75; do
    distill PAD_depth.py "configs/CIFAR-10/ConvIN/IPC$ipc.yaml" "depth-$ratio" --depth_ratio "$ratio"
    evaluate CIFAR10 "$ipc" ConvNet "depth-$ratio" S
  done
done
