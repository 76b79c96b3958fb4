#!/usr/bin/env bash
# Issue 30: the study over the long run (resumable: a scored point is never sampled again).
#   RUN=~/sgjax-runs/deep83 bash docs/results/deep83_trend/trend.sh "(2000,4000,8000,16000,32000)" [--config.study.…]
# Some steps were scored on earlier copies of the run, each lost with its machine. A restarted
# run reproduces them (the probe to 1.3e-5, screening FD to 1e-3: docs/results.md), so a studied
# step's tables kept in this folder are seeded into a run that lacks them rather than sampled
# again; whatever they lack is still sampled. Check the probe at those steps first.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PY:-.venv/bin/python}; export JAX_PLATFORMS=cpu
RUN=${RUN:-$HOME/sgjax-runs/deep83}; HERE=docs/results/deep83_trend
for f in "$HERE"/step_*_points.jsonl; do
  n=$(basename "$f" _points.jsonl); dir="$RUN/study/trend/$n"
  if [ -e "$dir/points.jsonl" ]; then continue; fi
  mkdir -p "$dir"
  for t in points finals paired; do
    if [ -e "$HERE/${n}_$t.jsonl" ]; then cp -n "$HERE/${n}_$t.jsonl" "$dir/$t.jsonl"; fi
  done
  if [ -e "$HERE/${n}_report.md" ]; then cp -n "$HERE/${n}_report.md" "$dir/report.md"; fi
  echo "== seeded $n from $HERE"
done
echo "== study at $1 $(date -u +%FT%T)"
$PY -m sgjax.jobs.study --config=sgjax/configs/fashion_mnist_deep_trend.py --workdir="$RUN" \
  --config.study.checkpoints="$1" "${@:2}"
echo "== done $(date -u +%FT%T)"
