#!/usr/bin/env bash
# The runs of the paper's two discussion figures (docs/gm_dm.md#the-papers-figures), shared by
# scripts/cpu/discussion.sh and scripts/reproduce/discussion.sh. Sourced, not run. Expects:
#   PYTHON DATASET DATA OUT SEEDS DEVICE           where and how
#   GM_CFG DM_CFG                                  config files; @IPC@ in a path becomes the IPC
#   F1_SETTINGS  "IPC:remove_hard" or "IPC:remove_easy" pairs for filter 1
#   F1_RATIOS F2_IPCS F2_RATIOS                    ratios (fractions) and IPCs
#   EXTRA_GM EXTRA_DM (arrays)                     --key value overrides for every run
#   EXTRA_GM_F2 EXTRA_DM_F2 (arrays)               more overrides for filter 2's runs
#   USER_EXTRA (array)                             last overrides (a tiny test run's)
#   SCORES (array)                                 rank_difficulty.py flags of the index file
# Every finished run leaves a marker, so a rerun after an interruption skips it.
set -euo pipefail

index="$OUT/data_indices/${DATASET}_GraNd.pt"

difficulty() {  # the index file of filter 1, once
  [ -f "$index" ] && return
  "$PYTHON" buffer/rank_difficulty.py --dataset "$DATASET" --data_path "$DATA" --method GraNd \
    --out "$OUT/data_indices" --device "$DEVICE" "${SCORES[@]}"
}

# one FILTER METHOD IPC KEY RATIO SEED: a DC (GM) or DM run, f<filter>-<method>-<key>-r<ratio>-s<seed>
one() {
  local filt=$1 method=$2 ipc=$3 key=$4 ratio=$5 seed=$6
  local name="f$filt-$method-$key-r$ratio-s$seed"
  [ -f "$OUT/.done_${ipc}_$name" ] && return
  local entry=DC cfg=${GM_CFG//@IPC@/$ipc} extra=("${EXTRA_GM[@]}")
  [ "$filt" = 2 ] && extra+=("${EXTRA_GM_F2[@]}")
  if [ "$method" = DM ]; then
    entry=DM cfg=${DM_CFG//@IPC@/$ipc} extra=("${EXTRA_DM[@]}")
    [ "$filt" = 2 ] && extra+=("${EXTRA_DM_F2[@]}")
  fi
  local filter_args=()
  [ "$filt" = 1 ] && filter_args=(--sort_method "$index")
  local resume=false
  [ -f "$OUT/logged_files/$DATASET/$ipc/$MODEL/$name/checkpoint.pt" ] && resume=true
  echo "== $name"
  "$PYTHON" "distill/$entry.py" --cfg "$cfg" --dataset "$DATASET" --data_path "$DATA" \
    --ipc "$ipc" --out_dir "$OUT/logged_files" --name "$name" --seed "$seed" \
    --eval_seed $((100 * seed)) --device "$DEVICE" --resume "$resume" \
    "${filter_args[@]}" --"$key" "$ratio" "${extra[@]}" "${USER_EXTRA[@]}"
  touch "$OUT/.done_${ipc}_$name"
}

all_runs() {
  difficulty
  for seed in $SEEDS; do
    for method in GM DM; do
      for setting in $F1_SETTINGS; do
        for ratio in $F1_RATIOS; do
          one 1 "$method" "${setting%%:*}" "${setting#*:}" "$ratio" "$seed"
        done
      done
      for ipc in $F2_IPCS; do
        for ratio in $F2_RATIOS; do one 2 "$method" "$ipc" depth_ratio "$ratio" "$seed"; done
      done
    done
  done
  "$PYTHON" scripts/discussion_figures.py --runs "$OUT/logged_files" --out "$OUT/discussion"
}
