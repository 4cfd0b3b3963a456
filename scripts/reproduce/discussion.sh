#!/usr/bin/env bash
# The paper's two discussion figures at paper scale (GPU; docs/gm_dm.md#the-papers-figures):
# CIFAR-10, ConvNet, the original DC and DM settings (configs/CIFAR-10/DC|DM/IPC<n>.yaml), GM run
# as DC (the paper's GM baselines are DC's), 3 seeds:
#   filter 1: IPC 1 remove_hard and IPC 500 remove_easy at 0/5/10/15/20/25/30/50 %;
#   filter 2: IPC 10 and IPC 500 at depth_ratio 0/25/50/75 %.
# Writes OUT/discussion.md and OUT/discussion.png (accuracy against ratio, baseline dashed).
#
#   bash scripts/reproduce/discussion.sh --data_path DIR [--device cuda:0]   # OUT=runs/discussion
#
# Cost: 2 methods x 3 seeds x (16 + 8 + 4 + 4) = 192 runs, not measured here (no GPU on this
# machine). The IPC-500 runs dominate: DC at IPC 500 runs 1000 iterations of 50 outer steps and
# 10 inner epochs on 5000 images, DM 20000 iterations of 10 x (256 + 500) images; count days of
# one GPU for the whole script, and run the IPC-500 settings on several GPUs in parallel
# (environment variables below select subsets: F1_SETTINGS, F2_IPCS, SEEDS).
# Environment overrides: DATASET, OUT, SEEDS, EXTRA (appended to every run's arguments),
# GM_CFG / DM_CFG (@IPC@ in the path is replaced), SCORE_ARGS, F1_SETTINGS, F1_RATIOS, F2_IPCS, F2_RATIOS.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
source scripts/env.sh
DATA="" DEVICE=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --data_path) DATA=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    *) echo "error: unknown option $1 (expected --data_path DIR, --device DEV)" >&2; exit 2 ;;
  esac
done
[ -n "$DATA" ] || { echo "error: give --data_path DIR (the CIFAR-10 folder)" >&2; exit 2; }
DATASET=${DATASET:-CIFAR10} OUT=${OUT:-$REPO/runs/discussion} SEEDS=${SEEDS:-"0 1 2"}
MODEL=${MODEL:-ConvNet}
GM_CFG=${GM_CFG:-configs/CIFAR-10/DC/IPC@IPC@.yaml}
DM_CFG=${DM_CFG:-configs/CIFAR-10/DM/IPC@IPC@.yaml}
F1_SETTINGS=${F1_SETTINGS:-"1:remove_hard 500:remove_easy"}
F1_RATIOS=${F1_RATIOS:-"0 0.05 0.1 0.15 0.2 0.25 0.3 0.5"}
F2_IPCS=${F2_IPCS-"10 500"} F2_RATIOS=${F2_RATIOS:-"0 0.25 0.5 0.75"}
read -r -a USER_EXTRA <<< "${EXTRA:-}"
EXTRA_GM=() EXTRA_DM=() EXTRA_GM_F2=() EXTRA_DM_F2=()
# GraNd as the paper's difficulty files (buffer/rank_difficulty.py's defaults: ResNet18, 10 x 40
# epochs); SCORE_ARGS replaces them
read -r -a SCORES <<< "${SCORE_ARGS:-}"
mkdir -p "$OUT"
source scripts/discussion_runs.sh
all_runs
