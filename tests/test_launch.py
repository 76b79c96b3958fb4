"""Launch scripts: shellcheck-clean (so are CI's and the results' scripts); the TPU launcher's
dry run is the expected gcloud sequence; the SLURM script hands every task the coordinator, the
process count and its own id."""

import glob
import os
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "tpu_dry_run_queued_v4.txt")
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh"))
                 + glob.glob(os.path.join(ROOT, "launch", "*.sbatch")))
# Scripts a user reruns to reproduce a result, and CI's own: held to the launchers' standard.
OTHER_SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "docs", "results", "*", "*.sh"))
                       + [os.path.join(ROOT, ".ci", "run")])


def _tpu(*args, check=True):
  return subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu.sh"), *args], cwd=ROOT,
                        capture_output=True, text=True, check=check)


def test_every_shell_script_passes_shellcheck():
  assert shutil.which("shellcheck"), "shellcheck missing: `make setup` installs it (Debian)"
  assert {"tpu.sh", "slurm_gpu.sbatch", "bench_suite.sh"} <= {os.path.basename(s)
                                                              for s in SCRIPTS}
  assert {"train.sh", "trend.sh", "run"} <= {os.path.basename(s) for s in OTHER_SCRIPTS}
  out = subprocess.run(["shellcheck", "--severity=style", *SCRIPTS, *OTHER_SCRIPTS],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr


def test_tpu_queued_pod_dry_run_is_the_expected_gcloud_sequence():
  out = _tpu("--name=sg-pod", "--zone=us-central2-b", "--accelerator-type=v4-32",
             "--project=my-proj", "--queued", "--spot",
             "--repo=https://github.com/example/sgjax.git", "--ref=main",
             "--workdir=gs://bucket/run1", "--extra=--config.train.batch_size=256", "all",
             "--dry-run").stdout
  assert out == open(GOLDEN).read()
  # What the golden file must get right, spelled out.
  cmds = [line for line in out.splitlines() if not line.startswith("#")]
  assert [line[2:] for line in out.splitlines() if line.startswith("#")] == [
      "preflight", "create", "setup", "train", "logs", "delete"]
  # Before anything is created: the train step compiled for the slice here, with the run's
  # own config overrides (sgjax.aot exits non-zero when it does not fit, and tpu.sh stops).
  assert cmds[0] == ("python3 -m sgjax.aot --config=configs/imagenet256.py --topology=v4-32 "
                     "--mode=train --config.train.batch_size=256")
  cmds = cmds[1:]
  assert all(c.startswith("gcloud compute tpus ") for c in cmds)
  assert all("--zone=us-central2-b --project=my-proj" in c for c in cmds)
  assert "queued-resources create sg-pod --node-id=sg-pod" in cmds[0]
  assert "--accelerator-type=v4-32" in cmds[0] and cmds[0].endswith("--spot")
  ssh = [c for c in cmds if " tpu-vm ssh " in c]
  # Setup and training run on every worker of the pod; logs follow worker 0.
  assert [c.split("--worker=")[1].split()[0] for c in ssh] == ["all", "all", "all", "0"]
  train_cmd = ssh[2]
  assert "sgjax.main --config=configs/imagenet256.py --workdir=gs://bucket/run1" in train_cmd
  assert "--distributed=cluster --config.train.batch_size=256" in train_cmd
  assert "nohup" in train_cmd
  assert cmds[-1].endswith("queued-resources delete sg-pod --zone=us-central2-b "
                           "--project=my-proj --force --quiet")


def test_tpu_local_checkout_is_copied_to_every_worker_and_direct_create(tmp_path):
  out = _tpu("--name=sg", "--zone=europe-west4-a", "--accelerator-type=v5litepod-16",
             f"--repo={tmp_path}", "--workdir=/tmp/w", "create", "setup", "delete",
             "--skip-preflight", "--dry-run").stdout
  cmds = [line for line in out.splitlines() if not line.startswith("#")]
  assert cmds[0] == ("gcloud compute tpus tpu-vm create sg --zone=europe-west4-a "
                     "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite")
  assert cmds[1].startswith(f"tar -czf /tmp/sgjax-src.tar.gz -C {tmp_path} --exclude=.venv")
  assert cmds[2] == ("gcloud compute tpus tpu-vm scp /tmp/sgjax-src.tar.gz sg:sgjax-src.tar.gz "
                     "--zone=europe-west4-a --worker=all")
  assert cmds[-1] == "gcloud compute tpus tpu-vm delete sg --zone=europe-west4-a --quiet"


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "create"], "--name is required"),
    (["--name=n", "--zone=z", "--accelerator-type=v9-8", "create"], "expected v4-N"),
    (["--name=n", "--zone=z", "train"], "train needs --workdir"),
    (["--name=n", "--zone=z", "deploy"], "unknown subcommand"),
])
def test_tpu_launcher_rejects_bad_input_before_any_command(args, message):
  out = _tpu(*args, "--dry-run", check=False)
  assert out.returncode == 2 and message in out.stderr
  assert "gcloud" not in out.stdout


def test_tpu_create_refuses_a_slice_the_config_does_not_fit(tmp_path):
  # A stand-in for the local python: its pre-flight reports DOES NOT FIT (exit 2).
  fake = tmp_path / "python3"
  _executable(fake, "#!/bin/sh\necho \"error: train_step: needs 40 GiB per chip\" >&2; exit 2\n")
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu.sh"), "--name=sg",
                        "--zone=z", "--accelerator-type=v5litepod-8", "create"], cwd=ROOT,
                       env=dict(os.environ, PYTHON=str(fake)), capture_output=True, text=True)
  assert out.returncode == 2
  assert "needs 40 GiB per chip" in out.stderr and "nothing created" in out.stderr
  assert "gcloud" not in out.stdout + out.stderr


def _executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_gives_each_task_coordinator_count_and_its_id(tmp_path):
  # Stand-ins for scontrol, srun (two tasks on this machine) and python (prints what it got).
  bin_ = tmp_path / "bin"
  bin_.mkdir()
  _executable(bin_ / "scontrol", "#!/bin/sh\nprintf 'gpu-node7\\ngpu-node8\\n'\n")
  _executable(bin_ / "srun", "#!/bin/bash\nshift  # --kill-on-bad-exit=1\n"
              "for id in 0 1; do SLURM_PROCID=$id \"$@\"; done\n")
  _executable(bin_ / "fakepython",
              "#!/bin/sh\necho \"$SGJAX_COORDINATOR $SGJAX_NUM_PROCESSES $SGJAX_PROCESS_ID $*\"\n")
  env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", SLURM_JOB_ID="1234",
             SLURM_JOB_NODELIST="gpu-node[7-8]", SLURM_NTASKS="2", WORKDIR="/shared/run",
             PYTHON="fakepython")
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch"),
                        "--config.train.batch_size=512"], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True).stdout.splitlines()
  tail = ("-m sgjax.main --config=configs/imagenet256.py --workdir=/shared/run "
          "--config.train.batch_size=512")
  assert out[1:] == [f"gpu-node7:21234 2 0 {tail}", f"gpu-node7:21234 2 1 {tail}"]
