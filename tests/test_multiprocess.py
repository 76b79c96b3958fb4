"""Two processes on localhost (4 CPU devices each, gloo collectives) train exactly as one 8-device
process: same global batches, same losses, same params; only process 0 writes metrics; the
checkpoint both processes wrote restores in a single process."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sgjax import checkpoint, distributed, models, sharding, train, validation
from sgjax import state as state_lib
from tests.builders import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
MESH = dict(data=2, fsdp=2, tensor=2)  # Params are split across the two processes too.
# One routed block: with tiny_config's three, each process's train step compiles ~50% longer.
MODEL = {"model.depth": 1, "sparsity.routes": ((0, 0, 0.5),)}
OVERRIDES = [f"--config.mesh.{k}={v}" for k, v in MESH.items()] + [
    f"--config.{k}={v}" for k, v in MODEL.items()] + [
    f"--config.train.num_steps={STEPS}", f"--config.train.checkpoint_every={STEPS}",
    "--config.train.log_every=1"]


def _config():
  """The runs' config: tiny_config with MODEL and MESH (what OVERRIDES give the command line)."""
  c = tiny_config()
  c.model.depth = MODEL["model.depth"]
  c.sparsity.routes = MODEL["sparsity.routes"]
  c.mesh.update(MESH)
  c.train.update(num_steps=STEPS, checkpoint_every=STEPS, log_every=1)
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(workdir: str, devices: int, *job_flags: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  xla = [f for f in env.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join([*xla, f"--xla_force_host_platform_device_count={devices}"])
  return subprocess.Popen(
      [sys.executable, "-m", "sgjax.main", "--config=tests/configs/tiny.py",
       f"--workdir={workdir}", *OVERRIDES, *job_flags],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[str]:
  t_end = time.time() + timeout
  try:
    # A failed process leaves its peer waiting in a collective: stop everything at once.
    while any(p.poll() is None for p in procs):
      if any(p.returncode not in (None, 0) for p in procs) or time.time() > t_end:
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    outs = [p.communicate()[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, f"exit {p.returncode}:\n{out[-4000:]}"
  return outs


def _metrics(workdir: str) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _restore(workdir: str, mesh):
  c = _config()
  model = models.from_config(c)
  abstract, _ = state_lib.abstract_state_and_shardings(
      model, state_lib.make_optimizer(c.train), c.seed, mesh)
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
  assert mngr.latest_step() == STEPS
  with jax.set_mesh(mesh):
    state = checkpoint.restore(mngr, abstract, None)
  mngr.close()
  return state


def _train_here(workdir: str) -> None:
  """The one-process run in this process (8 devices, like the test's): what `--mode=train`
  does with the pair's config and flags, without starting a third interpreter."""
  c = _config()
  validation.validate(c, jax.device_count(), job="train")
  train.train(c, workdir)


def test_two_processes_train_like_one(tmp_path):
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  address = f"127.0.0.1:{_free_port()}"
  pair = [_spawn(two, 4, f"--coordinator_address={address}", "--num_processes=2",
                 f"--process_id={p}") for p in range(2)]
  try:
    _train_here(one)  # Meanwhile.
  except BaseException:
    for p in pair:
      p.kill()
    raise
  outs = _wait(pair, timeout=300)

  # Same global batches: the per-step losses agree (another batch gives another loss).
  m_two, m_one = _metrics(two), _metrics(one)
  assert [m["step"] for m in m_two] == list(range(1, STEPS + 1))  # Written once, by process 0.
  np.testing.assert_allclose([m["loss"] for m in m_two], [m["loss"] for m in m_one], rtol=1e-5)
  assert len(os.listdir(os.path.join(two, "tensorboard"))) == 1
  assert "model:" in outs[0] and f"[{STEPS}/{STEPS}" in outs[0]
  assert "model:" not in outs[1] and f"[{STEPS}/{STEPS}" not in outs[1]

  # Each process saved its data iterator's position; both stand at the same global batch.
  data = os.path.join(two, "checkpoints", str(STEPS), "data")
  positions = [json.load(open(os.path.join(data, f"process_{p}-of-2.json"))) for p in range(2)]
  assert positions[0] == positions[1] == {"next_index": STEPS}
  # The checkpoint both processes wrote (params split between them) restores in one process
  # and equals the one-process run's.
  mesh = sharding.build_mesh(MESH)
  s_two, s_one = _restore(two, mesh), _restore(one, mesh)
  assert int(s_two["step"]) == STEPS
  for a, b in zip(jax.tree.leaves(s_two), jax.tree.leaves(s_one), strict=True):
    # Same partitioned program; gloo's cross-process all-reduce may round differently from the
    # in-process one (measured: params within 5e-8, losses within 1e-7).
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_distributed_plan_reads_flags_env_and_launchers():
  plan = distributed.plan
  assert plan(environ={}) is None  # A laptop: nothing to join.
  assert plan("cluster", environ={}) == {}  # Cloud TPU VM pod: JAX asks the metadata server.
  assert plan(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
              environ={}) == dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                                  process_id=3)
  env = {"SGJAX_COORDINATOR": "head:9999", "SGJAX_NUM_PROCESSES": "2", "SGJAX_PROCESS_ID": "1"}
  assert plan(environ=env) == dict(coordinator_address="head:9999", num_processes=2,
                                   process_id=1)
  assert plan(process_id=0, environ=env)["process_id"] == 0  # Flags win over the environment.
  assert plan("off", environ=env) is None
  assert plan(coordinator_address="h:1", num_processes=1, process_id=0, environ={}) is None
  # Launchers JAX configures itself from: an srun step with several tasks, mpirun, GKE.
  slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="n[1-2]", SLURM_NTASKS="2",
               SLURM_PROCID="0", SLURM_LOCALID="0")
  assert plan(environ=slurm) == {}
  assert plan(environ=dict(slurm, SLURM_NTASKS="1")) is None
  assert plan(environ={k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}) is None
  assert plan(environ={"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}) == {}
  assert plan(environ={"TPU_WORKER_HOSTNAMES": "w0,w1"}) == {}
  assert plan(environ={"TPU_WORKER_HOSTNAMES": "w0"}) is None
  for kwargs, message in [(dict(num_processes=2, process_id=0), "coordinator_address missing"),
                          (dict(coordinator_address="h:1", num_processes=2, process_id=2),
                           r"process_id = 2: must be in \[0, num_processes = 2\)"),
                          (dict(coordinator_address="h", num_processes=2, process_id=0),
                           "must be host:port"),
                          (dict(mode="mpi"), "distributed = 'mpi': allowed")]:
    with pytest.raises(ValueError, match=message):
      plan(**kwargs, environ={})
