#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (v4, v5e, v5p, v6e; one host or a pod): create the slice, put the
# code on every worker, install, run `python -m sgjax.main` on all workers at once, follow the
# log, delete the slice. Every gcloud call goes through `run`, so --dry-run prints exactly the
# commands a real run would execute (tests/test_launch.py checks them).
#
#   bash launch/tpu.sh --name=NAME --zone=ZONE --accelerator-type=v4-32 [options] \
#       preflight|create|setup|train|logs|delete|all [--dry-run]
#
# `preflight` compiles the config's train step for the slice on this machine (CPU + libtpu,
# `python -m sgjax.aot`, docs/scaling.md) and fails if it does not fit the chips' HBM; `create`
# runs it first and creates nothing when it fails (--skip-preflight to skip it).
#
# Options (all also accept "--flag value"):
#   --project=P            gcloud project (default: gcloud's configured one)
#   --version=V            TPU runtime (default from the accelerator type, see runtime_for)
#   --queued               request the slice as a queued resource (waits until ACTIVE)
#   --spot                 Spot VMs (pre-emptible: training checkpoints on SIGTERM, rerun resumes)
#   --repo=URL|PATH        git URL to clone on every worker, or a local checkout to scp
#                          (default: this checkout)
#   --ref=REF              git ref to check out after cloning (default: the clone's default)
#   --config=FILE          config file, relative to the repo (default configs/imagenet256.py)
#   --workdir=DIR          checkpoints and metrics; a gs:// path survives the slice (needs gcsfs,
#                          installed by setup); a local path lives on each worker's disk
#   --mode=train|sample|demo   sgjax.main mode (default train)
#   --extra="--config.a=b ..."  more sgjax.main flags, word-split
#   --skip-preflight       create without compiling for the slice first
#   --dry-run              print the commands instead of running them
# Environment: PYTHON = the local interpreter with sgjax and libtpu (default python3).
#
# `all` = preflight, create, setup, train, logs (until the run ends), delete. `logs` follows worker 0's log;
# Ctrl-C stops following, not the run.
set -euo pipefail

name="" zone="" accel="" project="" version="" queued=0 spot=0 dry_run=0 skip_preflight=0
repo="" ref="" config="configs/imagenet256.py" workdir="" mode="train" extra=""
remote_dir="sgjax"   # On each worker, relative to the home directory.
log_file="sgjax_train.log" pid_file="sgjax_train.pid"
# TPU VM images ship Python 3.10; uv installs the 3.12 that jax >= 0.10 needs into this venv.
venv="sgjax-venv"
steps=()

die() { echo "tpu.sh: $*" >&2; exit 2; }

# One shell word, single-quoted unless it needs no quoting: the dry run is copy-pastable.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command (one line) in dry-run mode; runs it otherwise.
run() {
  if ((dry_run)); then
    local out="" arg
    for arg in "$@"; do out+="$(quote "$arg") "; done
    echo "${out% }"
  else
    "$@"
  fi
}

# Default TPU VM runtime per generation (docs: cloud.google.com/tpu/docs/runtimes).
runtime_for() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "--accelerator-type=$1: expected v4-N, v5litepod-N, v5p-N or v6e-N" ;;
  esac
}

while (($#)); do
  arg=$1; shift
  case "$arg" in
    --*=*) key=${arg%%=*}; val=${arg#*=} ;;
    --queued|--spot|--dry-run|--skip-preflight|--help|-h) key=$arg; val="" ;;
    --*) key=$arg; (($#)) || die "$arg needs a value"; val=$1; shift ;;
    *) key=""; val=$arg ;;
  esac
  case "$key" in
    --name) name=$val ;;
    --zone) zone=$val ;;
    --accelerator-type) accel=$val ;;
    --project) project=$val ;;
    --version) version=$val ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --repo) repo=$val ;;
    --ref) ref=$val ;;
    --config) config=$val ;;
    --workdir) workdir=$val ;;
    --mode) mode=$val ;;
    --extra) extra=$val ;;
    --dry-run) dry_run=1 ;;
    --skip-preflight) skip_preflight=1 ;;
    --help|-h) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    "") case "$val" in
          preflight|create|setup|train|logs|delete) steps+=("$val") ;;
          all) steps+=(preflight create setup train logs delete) ;;
          *) die "unknown subcommand '$val' (preflight|create|setup|train|logs|delete|all)" ;;
        esac ;;
    *) die "unknown flag $key" ;;
  esac
done

((${#steps[@]})) || die "no subcommand given (preflight|create|setup|train|logs|delete|all)"
[[ -n $name ]] || die "--name is required"
[[ -n $zone ]] || die "--zone is required"
[[ $mode =~ ^(train|sample|demo)$ ]] || die "--mode=$mode: allowed: train, sample, demo"
here=$(cd "$(dirname "$0")/.." && pwd)
repo=${repo:-$here}
gcloud_tpu=(gcloud compute tpus)
where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")

preflighted=0
preflight() {
  [[ -n $accel ]] || die "preflight needs --accelerator-type"
  # The run's own config overrides (mesh, batch, remat) are what must fit; other flags are
  # sgjax.main's.
  local overrides=() word
  for word in $extra; do [[ $word == --config.* ]] && overrides+=("$word"); done
  if ! (cd "$here" && run "${PYTHON:-python3}" -m sgjax.aot --config="$config" \
      --topology="$accel" --mode=train "${overrides[@]}"); then
    die "pre-flight: $config does not compile or fit on $accel (see above); nothing created"
  fi
  preflighted=1
}

create() {
  [[ -n $accel ]] || die "create needs --accelerator-type"
  ((preflighted || skip_preflight)) || preflight
  local runtime=$version
  [[ -n $runtime ]] || runtime=$(runtime_for "$accel")
  local extra_flags=()
  ((spot)) && extra_flags+=(--spot)
  if ((queued)); then
    run "${gcloud_tpu[@]}" queued-resources create "$name" --node-id="$name" "${where[@]}" \
      --accelerator-type="$accel" --runtime-version="$runtime" "${extra_flags[@]}"
    # A queued request waits for capacity; the node exists only once the request is ACTIVE.
    if ((dry_run)); then
      run "${gcloud_tpu[@]}" queued-resources describe "$name" "${where[@]}" \
        --format='value(state.state)'
    else
      local state=""
      until [[ $state == ACTIVE ]]; do
        state=$("${gcloud_tpu[@]}" queued-resources describe "$name" "${where[@]}" \
          --format='value(state.state)')
        echo "queued resource $name: ${state:-?}"
        [[ $state =~ ^(FAILED|SUSPENDED)$ ]] && die "queued resource $name is $state"
        [[ $state == ACTIVE ]] || sleep 30
      done
    fi
  else
    run "${gcloud_tpu[@]}" tpu-vm create "$name" "${where[@]}" --accelerator-type="$accel" \
      --version="$runtime" "${extra_flags[@]}"
  fi
}

# One command on every worker of the slice at once.
on_all_workers() {
  run "${gcloud_tpu[@]}" tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"
}

setup() {
  if [[ $repo == *://* || $repo == git@* ]]; then
    local checkout=""
    [[ -n $ref ]] && checkout=" && git -C $remote_dir checkout $(printf '%q' "$ref")"
    on_all_workers "rm -rf $remote_dir && git clone $(printf '%q' "$repo") $remote_dir$checkout"
  else
    # A local checkout: its files as they are now (uncommitted edits included), without the
    # virtual environment and the workdirs.
    local archive=/tmp/sgjax-src.tar.gz
    run tar -czf "$archive" -C "$repo" --exclude=.venv --exclude=.git --exclude=workdirs \
      --exclude=__pycache__ .
    run "${gcloud_tpu[@]}" tpu-vm scp "$archive" "$name:sgjax-src.tar.gz" "${where[@]}" \
      --worker=all
    on_all_workers "rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf sgjax-src.tar.gz -C $remote_dir"
  fi
  # jax[tpu] brings libtpu; gcsfs lets orbax and tfds read and write gs:// paths.
  on_all_workers "python3 -m pip install -q --user uv && python3 -m uv venv -q --python 3.12 ~/$venv && cd $remote_dir && python3 -m uv pip install -q --python ~/$venv/bin/python 'jax[tpu]>=0.10,<0.13' -r requirements.txt gcsfs"
}

train() {
  [[ -n $workdir ]] || die "train needs --workdir (a gs:// path keeps results after delete)"
  # --distributed=cluster: jax.distributed.initialize() with no arguments; JAX reads the pod's
  # workers from the TPU metadata server (sgjax/distributed.py). nohup: the run outlives ssh.
  local cmd
  # shellcheck disable=SC2088  # The ~ is for the worker's shell to expand.
  cmd="~/$venv/bin/python -m sgjax.main --config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir")"
  cmd+=" --mode=$mode --distributed=cluster"
  [[ -n $extra ]] && cmd+=" $extra"
  on_all_workers "cd $remote_dir && (nohup $cmd > ~/$log_file 2>&1 < /dev/null & echo \$! > ~/$pid_file)"
}

logs() {
  # Worker 0 prints progress (the other workers' logs hold warnings only). tail --pid stops when
  # the run on worker 0 exits, so `all` then goes on to delete.
  run "${gcloud_tpu[@]}" tpu-vm ssh "$name" "${where[@]}" --worker=0 \
    --command="tail -n +1 -f --pid=\$(cat ~/$pid_file) ~/$log_file"
}

delete() {
  if ((queued)); then
    run "${gcloud_tpu[@]}" queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    run "${gcloud_tpu[@]}" tpu-vm delete "$name" "${where[@]}" --quiet
  fi
}

for step in "${steps[@]}"; do
  ((dry_run)) && echo "# $step"
  "$step"
done
