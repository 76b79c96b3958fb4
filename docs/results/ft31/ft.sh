#!/usr/bin/env bash
# Issue 31 item 3: a dense model made SG-ready by a short routed fine-tune, against routed from scratch.
# Every phase resumes/skips when rerun.
set -euo pipefail
cd /work/main
PY=".venv/bin/python"; export JAX_PLATFORMS=cpu
R=$HOME/sgjax-runs; FT=$R/ft; mkdir -p "$FT"
DEEP=sgjax/configs/fashion_mnist_deep.py
DENSE=(--config.sparsity.routes="()" --config.sample.guidance.rule=cfg)
echo "== dense twin to 1196 $(date -u +%T)"
$PY -m sgjax.main --config=$DEEP --workdir="$FT/dense" --mode=train "${DENSE[@]}" \
  --config.train.num_steps=1196
echo "== routed fine-tune from dense@1196, 3000 steps, every 100th kept $(date -u +%T)"
$PY -m sgjax.main --config=$DEEP --workdir="$FT/finetune" --mode=train \
  --config.train.init_from="$FT/dense" --config.train.num_steps=3000 \
  --config.train.checkpoint_every=100 --config.train.keep_period=100
echo "== routed from scratch at 1196+k: deep83's kept checkpoints resumed $(date -u +%T)"
for pair in "1250:1296,1375,1496" "2000:2196" "4000:4196"; do
  src=${pair%%:*}; targets=${pair#*:}; last=${targets##*,}; W="$FT/scratch_$last"
  if [ ! -d "$W/checkpoints/$src" ]; then
    mkdir -p "$W/checkpoints"; cp "$R/deep83/workdir.json" "$W/"
    cp -r "$R/deep83/checkpoints/$src" "$W/checkpoints/"
  fi
  for n in ${targets//,/ }; do
    $PY -m sgjax.main --config=$DEEP --workdir="$W" --mode=train --config.train.num_steps="$n" \
      --config.train.checkpoint_every=500 --config.train.keep_period=125
  done
done
for W in dense finetune scratch_1496 scratch_2196 scratch_4196; do
  cp -n "$R/deep83/fmnist_classifier.msgpack" "$FT/$W/"
done
echo "== probes $(date -u +%T)"
PROBE=(--config.study.stages="('probe',)")
$PY -m sgjax.jobs.study --config=$DEEP --workdir="$FT/dense" "${DENSE[@]}" "${PROBE[@]}" \
  --config.study.checkpoints="(1196,)"
$PY -m sgjax.jobs.study --config=$DEEP --workdir="$FT/finetune" "${PROBE[@]}" \
  --config.study.checkpoints="(0,100,300,1000,3000)"
$PY -m sgjax.jobs.study --config=$DEEP --workdir="$FT/scratch_1496" "${PROBE[@]}" \
  --config.study.checkpoints="(1296,1375,1496)"
$PY -m sgjax.jobs.study --config=$DEEP --workdir="$FT/scratch_2196" "${PROBE[@]}" \
  --config.study.checkpoints="(2196,)"
$PY -m sgjax.jobs.study --config=$DEEP --workdir="$FT/scratch_4196" "${PROBE[@]}" \
  --config.study.checkpoints="(4196,)"
echo "== done $(date -u +%T)"
