"""Joining a multi-process run: `jax.distributed.initialize` from flags or the environment.

Three cases, decided before any other JAX call (the backend must not have started):

- explicit: a coordinator address, the process count and this process's id, from flags or
  `SGJAX_COORDINATOR` / `SGJAX_NUM_PROCESSES` / `SGJAX_PROCESS_ID` (flags win). One process is
  a no-op. This is how the multi-process test and plain `ssh`-launched GPU hosts start.
- cluster: SLURM (`srun` with more than one task), Open MPI (`mpirun -n >1`) and GKE TPU
  multi-host pods announce themselves in environment variables, and Cloud TPU VM pods are
  detected by JAX through the metadata server; `jax.distributed.initialize()` then needs no
  arguments. The first three are recognised here; a Cloud TPU VM pod asks for it with
  `mode="cluster"` (`--distributed=cluster`, which `launch/tpu.sh` passes), because telling a
  pod from a single-host TPU VM or a Colab TPU needs that metadata query.
- otherwise: a single process, nothing to do.

CPU collectives across processes go through gloo, jax >= 0.10's default once the distributed
client exists (`jax_cpu_collectives_implementation`); nothing to set here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from sgjax import errors

MODES = ("auto", "cluster", "off")
ENV_COORDINATOR = "SGJAX_COORDINATOR"
ENV_NUM_PROCESSES = "SGJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SGJAX_PROCESS_ID"

# What JAX's own SLURM detection reads; SLURM_STEP_NODELIST exists only inside an `srun` step,
# so a batch script's own shell (one process) is not mistaken for the job.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def detect_cluster(environ: Mapping[str, str] = os.environ) -> str | None:
  """The multi-process launcher JAX can configure itself from, if the environment shows one."""
  if all(k in environ for k in _SLURM_VARS) and int(environ["SLURM_NTASKS"]) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in environ and int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "openmpi"
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  if "," in hosts:
    return "gke_tpu"
  return None


def _int_or_none(name: str, value: int | str | None) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise errors.UserError(f"{name} = {value!r}", "must be an integer") from None


def plan(mode: str = "auto", coordinator_address: str | None = None,
         num_processes: int | None = None, process_id: int | None = None,
         environ: Mapping[str, str] = os.environ) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

  Pure (reads only `environ`), so the decision is testable without starting anything.
  """
  if mode not in MODES:
    raise errors.UserError(f"distributed = {mode!r}", f"allowed: {', '.join(MODES)}")
  if mode == "off":
    return None
  address = coordinator_address or environ.get(ENV_COORDINATOR) or None
  count = _int_or_none("num_processes", num_processes if num_processes is not None
                       else environ.get(ENV_NUM_PROCESSES))
  index = _int_or_none("process_id", process_id if process_id is not None
                       else environ.get(ENV_PROCESS_ID))
  if address or count is not None or index is not None:
    missing = [n for n, v in (("coordinator_address", address), ("num_processes", count),
                              ("process_id", index)) if v is None]
    if missing:
      raise errors.UserError("distributed", f"{', '.join(missing)} missing",
                             "an explicit multi-process run needs coordinator_address, "
                             "num_processes and process_id (flags or "
                             f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    if count < 1:
      raise errors.UserError(f"num_processes = {count}", "must be >= 1")
    if not 0 <= index < count:
      raise errors.UserError(f"process_id = {index}", f"must be in [0, num_processes = {count})")
    if ":" not in address:
      raise errors.UserError(f"coordinator_address = {address!r}", "must be host:port")
    if count == 1:
      return None
    return dict(coordinator_address=address, num_processes=count, process_id=index)
  if mode == "cluster" or detect_cluster(environ):
    return {}  # JAX reads the launcher's environment (or the TPU metadata server) itself.
  return None


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Joins the multi-process run if there is one; True if `jax.distributed` was initialized.

  Must run before anything touches a JAX backend (`jax.devices()`, any computation).
  """
  kwargs = plan(mode, coordinator_address, num_processes, process_id)
  if kwargs is None:
    return False
  import jax  # Local: importing is harmless, but keep this module's import free of JAX.
  jax.distributed.initialize(**kwargs)
  return True
