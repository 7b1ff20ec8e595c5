#!/usr/bin/env bash
# Every paper table at `scale=tiny` on the built-in credit-assignment task (dataset=synthetic_credit, issue
# #22; SEEDS, default 5 seeds), then one report per table with its matched-KL verdicts against the controls
# (the oracle, random and equal weights of experiment=variant_credit) and the exact optimal frontier; then
# the other built-in tasks (conf/experiment/variant_*.yaml; the old default task is variant_default).
# Every run records the dense default curve (eval.every_n_steps=10 with steps 1, 2, 4, 8 first, 256 prompts).
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
SEEDS=${SEEDS:-0,1,2,3,4}
PYTHON=${PYTHON:-python}
export WANDB_MODE=${WANDB_MODE:-disabled}
mkdir -p "$OUT/sweeps" "$OUT/reports" "$OUT/logs"

# Longest first (jobs x seconds per job), so the two lanes finish close together.
# (tisdpo_llm_generated trains its own SFT model and estimators on the contrastive pairs: not last.)
# variant_credit first: every table's report reads its controls.
EXPERIMENTS=(
  variant_credit tidpo_label_noise tidpo_ablation tisdpo_comparison tisdpo_pku_main tisdpo_llm_generated
  tidpo_main tisdpo_tldr tisdpo_ultrafeedback tisdpo_ablation
)
# The default task and its harder variants (one experiment each: DPO, TIS-DPO(D), the oracle, TI-DPO).
for variant in conf/experiment/variant_*.yaml; do
  name=$(basename "$variant" .yaml)
  [ -e "$variant" ] && [ "$name" != variant_credit ] && EXPERIMENTS+=("$name")
done
# ONLY="variant_default variant_context": just those experiments
if [ -n "${ONLY:-}" ]; then read -r -a EXPERIMENTS <<<"$ONLY"; fi

sweep() {  # one table: the multirun, then its report; appends "name  seconds  rc" to timing.tsv
  local name=$1 start rc=0
  start=$(date +%s)
  # cache.reuse_runs: a row two tables share (same config, seed and code) runs once
  "$PYTHON" run.py -m "experiment=$name" scale=tiny "seed=$SEEDS" cache.reuse_runs=true logger=csv \
    trainer.enable_progress_bar=false "hydra.sweep.dir=$OUT/sweeps/$name" >"$OUT/logs/$name.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$(( $(date +%s) - start ))" "$rc" >>"$OUT/timing.tsv"
  "$PYTHON" -m experiments.report "$OUT/sweeps/$name" --out "$OUT/reports/$name" >>"$OUT/logs/$name.log" 2>&1 || rc=$?
  echo "$name: rc=$rc ($(( $(date +%s) - start )) s)"
}
export -f sweep
export OUT PYTHON SEEDS

: >"$OUT/timing.tsv"
start=$(date +%s)
# In one subshell, so that `times` sees every sweep and report (the pipeline's processes are its children).
(
  printf '%s\n' "${EXPERIMENTS[@]}" | xargs -P "$LANES" -I{} bash -c 'sweep {}'
  echo "all tables: $(( $(date +%s) - start )) s wall on $LANES lanes; per table: $OUT/timing.tsv"
  # `times` redirected, not piped: a pipeline would run it in a fresh subshell that has no children
  times >"$OUT/times.txt"
  tail -1 "$OUT/times.txt" | awk '{print "CPU time (user, sys) of all sweeps and reports: " $1 ", " $2}' | tee -a "$OUT/timing.tsv"
)
# The tables' reports again, now that variant_credit has finished: each table's matched-KL section gains the
# oracle, random and equal-weight controls of the same task (and every report shows the optimal frontier).
# (Not tisdpo_llm_generated: it trains on pairs its SFT model generated, the controls on the human pairs.)
for name in "${EXPERIMENTS[@]}"; do
  case $name in variant_*|tisdpo_llm_generated) continue ;; esac
  "$PYTHON" -m experiments.report "$OUT/sweeps/$name" --out "$OUT/reports/$name" \
    --controls "$OUT/sweeps/variant_credit" >>"$OUT/logs/$name.log" 2>&1 || echo "$name: report with controls failed"
done
# Issue #22's done-when criteria on the credit task (5 seeds), by code independent of the reports.
if [ -d "$OUT/sweeps/variant_credit" ]; then
  "$PYTHON" -m experiments.credit_check "$OUT/sweeps/variant_credit" --json "$OUT/reports/credit_check.json" \
    | tee "$OUT/reports/credit_check.txt" || true
fi
# Each variant read again at low KL (0.05-0.2 nats), where TI-DPO's curves are (they stop short of the range
# DPO and the oracle reach), then every variant's matched-KL cells in one table (copied from the reports).
for name in "${EXPERIMENTS[@]}"; do
  case $name in variant_*) ;; *) continue ;; esac
  "$PYTHON" -m experiments.report "$OUT/sweeps/$name" --budgets 0.05,0.1,0.15,0.2 --out "$OUT/reports/$name/low_kl" \
    >>"$OUT/logs/$name.log" 2>&1 || echo "$name: low-KL report failed"
done
if compgen -G "$OUT/reports/variant_*" >/dev/null; then
  "$PYTHON" -m experiments.variants_summary "$OUT"/reports/variant_* "$OUT"/reports/variant_*/low_kl \
    --out "$OUT/reports/variants_summary.md" || echo "variants summary failed"
fi
