#!/usr/bin/env bash
# Issue 30: the long run of the 83% model. Resumes where it stopped; stop it with SIGTERM
# (a checkpoint is written). Every 125th checkpoint kept to step 2000 (AG guides at 1/16 of early
# checkpoints), every 500th after. STEPS is only an upper bound.
#   RUN=~/sgjax-runs/deep83 STEPS=32000 bash docs/results/deep83_trend/train.sh >> ~/sgjax-runs/deep83.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PY:-.venv/bin/python}; export JAX_PLATFORMS=cpu
RUN=${RUN:-$HOME/sgjax-runs/deep83}; STEPS=${STEPS:-32000}
DEEP=sgjax/configs/fashion_mnist_deep.py
echo "== to 2000, every 125th $(date -u +%FT%T)"
$PY -m sgjax.main --config=$DEEP --workdir="$RUN" --mode=train --config.train.num_steps=2000 \
  --config.train.checkpoint_every=125 --config.train.keep_period=125
echo "== to $STEPS, every 500th $(date -u +%FT%T)"
exec $PY -m sgjax.main --config=$DEEP --workdir="$RUN" --mode=train --config.train.num_steps="$STEPS" \
  --config.train.checkpoint_every=500 --config.train.keep_period=125
