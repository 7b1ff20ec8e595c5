#!/usr/bin/env bash
# GPU rehearsal of the paper scale: one TIS-DPO(D) row and one TI-DPO row through every stage on a
# random 1B-class Llama, the DPO-step and scoring benchmarks, and the cost table (about 8 minutes on
# one H200). Run from anywhere; extra arguments go to experiments/rehearse_gpu.py
# (e.g. --cpu-smoke, --no-bench, --out DIR). The log is kept next to the results.
set -euo pipefail
cd "$(dirname "$0")/.."
out="outputs/rehearse_gpu"
for arg in "$@"; do [[ "${prev:-}" == "--out" ]] && out="$arg"; prev="$arg"; done
mkdir -p "$(dirname "$out")"
log="$(dirname "$out")/rehearse_gpu.log"
python -m experiments.rehearse_gpu "$@" 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
