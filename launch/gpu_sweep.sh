#!/usr/bin/env bash
# The quality-vs-compute sweep on one GPU, in one device call: train the routed Fashion-MNIST
# demo (configs/fashion_mnist_gpu.py, a few minutes), then evaluate its guidance grid at 5,000
# samples a point (FD-FMNIST and class accuracy against the test split; plots). Both stages
# resume from the workdir, so a call cut off by a time limit continues when run again on the
# same machine. The log, results.jsonl and the plots are copied to ${OUT:-gpu_sweep_out}/.
#
#   make device-data                       # here: the idx files into data/fashion-mnist
#   bash launch/gpu_sweep.sh [--config.…]  # on the device: carry .whl and data/fashion-mnist
set -euo pipefail
cfg=configs/fashion_mnist_gpu.py
workdir=${WORKDIR:-workdirs/fashion_mnist_gpu}
out=${OUT:-gpu_sweep_out}
mkdir -p "$out"
data=()
if [[ -d data/fashion-mnist ]]; then  # Carried into the checkout; else the Debian package's.
  data=(--config.data.dir=data/fashion-mnist)
fi
python -m sgjax.main --config=$cfg --workdir="$workdir" --mode=train "${data[@]}" "$@" 2>&1 \
  | tee -a "$out/train.log"
python -m sgjax.jobs.sweep --config=$cfg --workdir="$workdir" "${data[@]}" "$@" 2>&1 \
  | tee -a "$out/sweep.log"
shopt -s nullglob  # No plots where matplotlib is missing: the table is what matters.
plots=("$workdir"/sweep/*.png)
cp "$workdir"/sweep/results.jsonl "${plots[@]}" "$out"/
