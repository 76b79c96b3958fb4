#!/usr/bin/env bash
# Issue 30: the study over the long run (resumable: a scored point is never sampled again).
#   RUN=~/sgjax-runs/deep83 bash docs/results/deep83_trend/trend.sh "(2000,4000,8000,16000,32000)" [--config.study.…]
# Step 2000 was scored on the first copy of the run (lost with its machine on 2026-12-07); the
# restarted run reproduces its screening FD to 1e-3 (docs/results.md), so its tables are seeded
# from this folder rather than sampled again.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PY:-.venv/bin/python}; export JAX_PLATFORMS=cpu
RUN=${RUN:-$HOME/sgjax-runs/deep83}; HERE=docs/results/deep83_trend
S2000="$RUN/study/trend/step_2000"
if [ ! -e "$S2000/points.jsonl" ]; then
  mkdir -p "$S2000"
  for t in points finals paired; do cp -n "$HERE/step_2000_$t.jsonl" "$S2000/$t.jsonl"; done
fi
echo "== study at $1 $(date -u +%FT%T)"
$PY -m sgjax.jobs.study --config=sgjax/configs/fashion_mnist_deep_trend.py --workdir="$RUN" \
  --config.study.checkpoints="$1" "${@:2}"
echo "== done $(date -u +%FT%T)"
