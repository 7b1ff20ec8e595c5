#!/usr/bin/env bash
# Every paper table at `scale=tiny` on the built-in task (3 seeds each), then one report per table.
#
#   bash experiments/reproduce_tiny.sh [OUT]          # default OUT=outputs/tiny_reproduction
#
# Sweeps: OUT/sweeps/<experiment>; reports: OUT/reports/<experiment>; timings: OUT/timing.tsv.
# Tiny jobs run on one torch thread each, so two sweeps run side by side (LANES, default 2 = one per
# core); each lane takes the next table, longest first. Runs share the artifact cache
# (TISDPO_CACHE, default .cache/tisdpo), so each SFT model and weight estimator is trained once.
# Set TISDPO_CACHE to an empty dir to time the whole thing from cold, as in experiments/results.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/tiny_reproduction}
LANES=${LANES:-2}
PYTHON=${PYTHON:-python}
export WANDB_MODE=${WANDB_MODE:-disabled}
mkdir -p "$OUT/sweeps" "$OUT/reports" "$OUT/logs"

# Longest first (jobs x seconds per job), so the two lanes finish close together.
# (tisdpo_llm_generated trains its own SFT model and estimators on the contrastive pairs: not last.)
EXPERIMENTS=(
  tidpo_label_noise tidpo_ablation tisdpo_comparison tisdpo_pku_main tisdpo_llm_generated
  tidpo_main tisdpo_tldr tisdpo_ultrafeedback tisdpo_ablation
)

sweep() {  # one table: the multirun, then its report; appends "name  seconds  rc" to timing.tsv
  local name=$1 start rc=0
  start=$(date +%s)
  "$PYTHON" run.py -m "experiment=$name" scale=tiny logger=csv trainer.enable_progress_bar=false \
    "hydra.sweep.dir=$OUT/sweeps/$name" >"$OUT/logs/$name.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$(( $(date +%s) - start ))" "$rc" >>"$OUT/timing.tsv"
  "$PYTHON" -m experiments.report "$OUT/sweeps/$name" --out "$OUT/reports/$name" >>"$OUT/logs/$name.log" 2>&1 || rc=$?
  echo "$name: rc=$rc ($(( $(date +%s) - start )) s)"
}
export -f sweep
export OUT PYTHON

: >"$OUT/timing.tsv"
start=$(date +%s)
printf '%s\n' "${EXPERIMENTS[@]}" | xargs -P "$LANES" -I{} bash -c 'sweep {}'
echo "all tables: $(( $(date +%s) - start )) s wall on $LANES lanes; per table: $OUT/timing.tsv"
