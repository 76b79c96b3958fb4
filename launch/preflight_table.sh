#!/usr/bin/env bash
# The TPU pre-flight rows of docs/scaling.md: each row's command, run on a CPU machine with
# libtpu (`pip install "jax[tpu]==<jax>"`). Writes docs/preflight/<row>.{txt,json}.
#   bash launch/preflight_table.sh [ROW ...]   (default: every row; XL/2 ≈ 4-8 min each on 2 cores)
#   TRAFFIC_ONLY=1 bash launch/preflight_table.sh [ROW ...]   adds the analytic HBM traffic to the
#     saved <row>.json (traced, not compiled: ≈ 30 s a row) and recomputes its estimate
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-.venv/bin/python}
OUT=${OUT:-docs/preflight}
mkdir -p "$OUT"

declare -A ROWS=(
  [xl2_routed_v5p-8]="--config=configs/imagenet256.py --topology=v5p-8 --mode=train --config.mesh.data=1 --config.mesh.fsdp=4"
  [xl2_dense_v5p-8]="--config=configs/imagenet256.py --topology=v5p-8 --mode=train --config.mesh.data=1 --config.mesh.fsdp=4 --config.sparsity.routes=() --config.sample.guidance.rule=cfg"
  [xl2_routed_v5e-8]="--config=configs/imagenet256.py --topology=v5litepod-8 --mode=train --config.mesh.data=1 --config.mesh.fsdp=8"
  [xl2_dense_v5e-8]="--config=configs/imagenet256.py --topology=v5litepod-8 --mode=train --config.mesh.data=1 --config.mesh.fsdp=8 --config.sparsity.routes=() --config.sample.guidance.rule=cfg"
  [xl2_routed_v6e-8]="--config=configs/imagenet256.py --topology=v6e-8 --mode=train --config.mesh.data=1 --config.mesh.fsdp=8"
  [xl2_dense_v6e-8]="--config=configs/imagenet256.py --topology=v6e-8 --mode=train --config.mesh.data=1 --config.mesh.fsdp=8 --config.sparsity.routes=() --config.sample.guidance.rule=cfg"
  [xl2_routed_v5p-64]="--config=configs/imagenet256.py --topology=v5p-64 --mode=train --config.mesh.data=4 --config.mesh.fsdp=8"
  [xl2_dense_v5p-64]="--config=configs/imagenet256.py --topology=v5p-64 --mode=train --config.mesh.data=4 --config.mesh.fsdp=8 --config.sparsity.routes=() --config.sample.guidance.rule=cfg"
  [xl2_routed_v5e-32]="--config=configs/imagenet256.py --topology=v5litepod-32 --mode=train --config.mesh.data=4 --config.mesh.fsdp=8"
  [xl2_sample_v5p-8]="--config=configs/imagenet256.py --topology=v5p-8 --mode=sample --config.mesh.data=1 --config.mesh.fsdp=4"
  [xl2_sample_v5e-8]="--config=configs/imagenet256.py --topology=v5litepod-8 --mode=sample --config.mesh.data=1 --config.mesh.fsdp=8"
  [t2i_2p5b_v5p-8]="--config=configs/t2i_2p5b.py --topology=v5p-8 --mode=train --config.mesh.data=1 --config.mesh.fsdp=4 --config.train.grad_accum=48"
  [t2i_2p5b_v6e-8]="--config=configs/t2i_2p5b.py --topology=v6e-8 --mode=train --config.mesh.data=1 --config.mesh.fsdp=8 --config.train.grad_accum=96"
)
ORDER=(xl2_routed_v5p-8 xl2_sample_v5p-8 xl2_routed_v5e-8 xl2_dense_v5e-8 xl2_dense_v5p-8
       xl2_routed_v6e-8 xl2_dense_v6e-8 xl2_routed_v5p-64 xl2_dense_v5p-64 xl2_routed_v5e-32 xl2_sample_v5e-8
       t2i_2p5b_v5p-8 t2i_2p5b_v6e-8)
[ $# -gt 0 ] && ORDER=("$@")
for row in "${ORDER[@]}"; do
  args=${ROWS[$row]:?unknown row $row}
  if [ -n "${TRAFFIC_ONLY:-}" ]; then
    echo "== $row (analytic traffic): python -m sgjax.aot $args --traffic_only" | tee -a "$OUT/$row.txt"
    # shellcheck disable=SC2086
    "$PY" -m sgjax.aot $args --json="$OUT/$row.json" --traffic_only 2>&1 | tee -a "$OUT/$row.txt"
    echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/$row.txt"
    continue
  fi
  echo "== $row: python -m sgjax.aot $args" | tee "$OUT/$row.txt"
  # shellcheck disable=SC2086  # The row's flags are words.
  "$PY" -m sgjax.aot $args --json="$OUT/$row.json" 2>&1 | tee -a "$OUT/$row.txt"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/$row.txt"
done
