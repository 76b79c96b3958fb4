#!/usr/bin/env bash
# Issue 31 item 3, finals: the same budget search (none, CFG, SG) on the routed fine-tune at step K
# and on routed-from-scratch at 1196+K, then the two paired (A = fine-tune, B = scratch).
# Usage: ft_finals.sh K   (resumable)
set -euo pipefail
cd /work/main
export JAX_PLATFORMS=cpu
K=$1; N=$((1196 + K)); FT=$HOME/sgjax-runs/ft
SCRATCH=""
for d in "$FT"/scratch_*; do [ -d "$d/checkpoints/$N" ] && SCRATCH=$d; done
[ -n "$SCRATCH" ] || { echo "no scratch run holds step $N" >&2; exit 2; }
STUDY=(--config=sgjax/configs/fashion_mnist_deep_trend.py --config.study.rules="('cfg','sg')"
       --config.study.guides="()" --config.study.ag_cosine="()")
.venv/bin/python -m sgjax.jobs.study "${STUDY[@]}" --workdir="$FT/finetune" --config.study.checkpoints="($K,)"
.venv/bin/python -m sgjax.jobs.study "${STUDY[@]}" --workdir="$SCRATCH" --config.study.checkpoints="($N,)"
OUT=$FT/compare_k${K}.jsonl
[ -e "$OUT" ] && mv "$OUT" "$OUT.$(date +%s)"
.venv/bin/python -m sgjax.jobs.study.compare "${STUDY[@]}" --workdir="$FT/finetune" --step="$K" \
  --other="$SCRATCH" --other_step="$N" --out="$OUT"
