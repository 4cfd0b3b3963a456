#!/usr/bin/env bash
# The paper's two discussion figures at CPU scale (docs/gm_dm.md#the-papers-figures):
# Fashion-MNIST (the first 300 train images per class), ConvNetW32, GM (= DC, as the paper's
# GM baselines) and DM, 3 seeds: filter 1 at remove_hard 0/10/20/30 % for IPC 1, filter 2 at
# depth_ratio 0/25/50/75 % for IPC 10. Writes OUT/discussion.md (table) and OUT/discussion.png
# (the paper's panel layout: accuracy against ratio, baseline dashed, mean +- std over seeds).
#
#   bash scripts/cpu/discussion.sh                 # OUT=runs/cpu/discussion
#
# Cost: 48 runs (24 per filter) plus one GraNd scoring; each run ends with one evaluation of
# 5 networks x 300 epochs. Estimated from the per-iteration times of scripts/bench/README.md,
# not measured end to end: about 3 hours on an idle 2-core CPU with OMP_NUM_THREADS=1, most of
# it in the 12 DC runs at IPC 10. Environment overrides (e.g. for a tiny test run):
# DATASET, DATA, OUT, SEEDS, MAX_PER_CLASS, F1_RATIOS, F2_IPCS, F2_RATIOS, EXTRA (appended to
# every run's arguments).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
source scripts/env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DATASET=${DATASET:-FashionMNIST} DATA=${DATA:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-$REPO/runs/cpu/discussion} SEEDS=${SEEDS:-"0 1 2"} DEVICE=cpu MODEL=ConvNetW32
MAX_PER_CLASS=${MAX_PER_CLASS:-300}
read -r -a USER_EXTRA <<< "${EXTRA:-}"
GM_CFG=configs/cpu/gm_dm/FashionMNIST_IPC1_DC.yaml
DM_CFG=configs/cpu/gm_dm/FashionMNIST_IPC1_DM.yaml
F1_SETTINGS="1:remove_hard" F1_RATIOS=${F1_RATIOS:-"0 0.1 0.2 0.3"}
F2_IPCS=${F2_IPCS:-10} F2_RATIOS=${F2_RATIOS:-"0 0.25 0.5 0.75"}
EXTRA_GM=(--max_per_class "$MAX_PER_CLASS") EXTRA_DM=(--max_per_class "$MAX_PER_CLASS")
# DC at IPC 10 with the DC table's (10, 50) loops costs ~100 IPC-1 iterations: shortened here
# to (10, 5) loops and 20 iterations (the README states it beside the results).
EXTRA_GM_F2=(--outer_loop 10 --inner_loop 5 --Iteration 20 --eval_it 20) EXTRA_DM_F2=()
SCORES=(--model ConvNetW32 --epochs 3 --repeat 1 --batch 128 --max_per_class "$MAX_PER_CLASS")
mkdir -p "$OUT"
source scripts/discussion_runs.sh
all_runs
