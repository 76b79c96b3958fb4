#!/usr/bin/env bash
# The benchmark suite, one device call per group: bf16 matmul peak, SiT-XL/2 train step dense
# and routed at batch 128, batch 256 with and without remat, and the guided sampling step at
# batch 256 (train, sample; all = both, ≈ 7 min on an H100); where a step's time goes (profile:
# traces of the dense and routed train steps summed by kind of work, the routes' gather/scatter
# alone, and the routed step fed by the grain pipeline vs synthetic inputs, ≈ 5 min); XLA flag
# candidates A/B against the default on the dense train step and the CFG sampling step (flags,
# ≈ 1 min per variant; an unknown flag fails its row only). Each case runs in its own process
# (an OOM in one does not stop the rest); JSON per case goes to ${OUT:-bench_out}/, a short
# table is printed last.
#
#   bash launch/bench_suite.sh [train|sample|all|profile|flags]
set -uo pipefail
what=${1:-all}
out=${OUT:-bench_out}
# JAX takes 75% of GPU memory by default; the batch-256 cases need more of the card.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
mkdir -p "$out"
cfg=configs/imagenet256.py
run() {  # name, then bench flags
  local name=$1; shift
  echo "=== $name: python -m sgjax.jobs.bench --config=$cfg $*"
  if python -m sgjax.jobs.bench --config=$cfg --json "$@" > "$out/$name.json" 2> "/tmp/$name.err"; then
    echo "ok"
  else
    echo "FAILED (tail of /tmp/$name.err):"; tail -5 "/tmp/$name.err"; rm -f "$out/$name.json"
  fi
}
if [[ $what != profile && $what != flags ]]; then
  run peak --what=peak
fi
if [[ $what == train || $what == all ]]; then
  run train_dense_b128 --what=train --config.train.batch_size=128 --config.sparsity.routes="()" \
    --config.sample.guidance.rule=cfg --config.sample.guidance.gamma_strong=0
  run train_routed_b128 --what=train --config.train.batch_size=128
  run train_routed_b256 --what=train --config.train.batch_size=256
  run train_routed_b256_remat --what=train --config.train.batch_size=256 --config.model.remat=dots
fi
if [[ $what == sample || $what == all ]]; then
  run sample_b256 --what=sample --config.sample.batch_size=256 --steps=20
fi
if [[ $what == profile ]]; then
  dense=(--config.sparsity.routes="()" --config.sample.guidance.rule=cfg
         --config.sample.guidance.gamma_strong=0)
  # Traces are not kept (a temporary folder, removed): tens of MB each, they could crowd the
  # JSON out of what a device call brings back. Pass --profile_dir to a single run to keep one.
  run profile_dense_b128 --what=profile --config.train.batch_size=128 "${dense[@]}"
  run profile_routed_b128 --what=profile,route_cost --config.train.batch_size=128
  run input_routed_b128 --what=input --config.train.batch_size=128 --steps=30
  run input_routed_b128_workers4 --what=input --config.train.batch_size=128 --steps=30 \
    --config.data.worker_count=4
fi
if [[ $what == flags ]]; then
  # Each variant: "name|flags". Candidates for the dense step's matmuls and launch overhead.
  variants=(
    "default|"
    "exhaustive_tiling|--xla_gpu_exhaustive_tiling_search=true"
    "triton_gemm_any|--xla_gpu_triton_gemm_any=true"
    "no_command_buffer|--xla_gpu_enable_command_buffer="
    "no_triton_gemm|--xla_gpu_enable_triton_gemm=false"
  )
  for v in "${variants[@]}"; do
    name=${v%%|*}; flags=${v#*|}
    XLA_FLAGS="$flags" run "flags_${name}_train_dense_b128" --what=train \
      --config.train.batch_size=128 --config.sparsity.routes="()" \
      --config.sample.guidance.rule=cfg --config.sample.guidance.gamma_strong=0
    # The sampling bench adds its own default (Triton GEMMs off) unless XLA_FLAGS names it.
    XLA_FLAGS="$flags" run "flags_${name}_sample_cfg_b256" --what=sample --rules=cfg \
      --config.sample.batch_size=256 --steps=20 --nofull_sampler
  done
fi
python - "$out" <<'PY'
import glob, json, os, sys
from sgjax import bench
out = sys.argv[1]
peak = None
if os.path.exists(f"{out}/peak.json"):
  r = json.load(open(f"{out}/peak.json"))
  peak = r["peak"]["tflops"]
  print(f"\ndevice {r['device']}, jax {r['jax']}")
for path in sorted(glob.glob(f"{out}/*.json")):
  print(f"--- {os.path.basename(path)[:-5]}")
  bench.print_table(json.load(open(path)), peak)
PY
