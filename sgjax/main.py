"""Entry point: flags -> config -> mode. Nothing else lives here.

  python -m sgjax.main --config=configs/fashion_mnist.py --workdir=DIR \
      [--mode=train|sample|demo|eval]
      [--config.train.num_steps=...] [--verbose]

A mistake the user can fix (a bad or unknown config field, a workdir that holds another model,
a damaged checkpoint, a bad evaluation input) ends with one `error: …` line and exit status 2;
`--verbose` adds the traceback (sgjax.errors).
"""

from __future__ import annotations

import os

from absl import flags, logging
from ml_collections import config_flags

from sgjax import errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and samples go here.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "demo", "eval"],
                          "train: train (resuming from workdir); sample: write grids and .npz "
                          "with config.sample.guidance; demo: train, then sample and score CFG "
                          "and SG; eval: sample config.eval.num_samples with the configured "
                          "guidance and write metrics.json (FID, sFID, IS, precision/recall).")
# Multi-process runs (sgjax/distributed.py); a single process needs none of these.
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "cluster", "off"],
                                 "auto: join when coordinator flags/SGJAX_* env vars or a "
                                 "SLURM/Open MPI/GKE multi-process launch are present; cluster: "
                                 "jax.distributed.initialize() with no arguments (Cloud TPU VM "
                                 "pods); off: never.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (env SGJAX_COORDINATOR).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (env SGJAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's id, 0..num_processes-1 (env SGJAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  del argv
  # Orbax and grain log every save at INFO; the console shows our progress lines instead.
  logging.set_verbosity(logging.WARNING)
  from sgjax import platform
  platform.set_default_xla_flags(sampling=_MODE.value in ("sample", "eval"))
  from sgjax import distributed
  # Before any other JAX call: the backend must start knowing every process.
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)
  # Local imports from here on: XLA flags must be in place before anything imports jax.
  import jax

  from sgjax import train, validation
  from sgjax.jobs import demo, evaluate, sample

  config = _CONFIG.value
  workdir = _WORKDIR.value
  from sgjax import workdir as workdir_lib
  # A checkpoint step, checkpoints/ or an output folder of a run: name the run to pass.
  workdir_lib.refuse_inside_a_run(workdir, f"--workdir={workdir}")
  # Each mode checks the fields it reads (a training run does not read sweep.* or eval.*).
  if _MODE.value == "demo":
    demo.validate(config, jax.device_count())
  else:
    validation.validate(config, jax.device_count(), job=_MODE.value)
  if _MODE.value in ("train", "demo"):
    train.train(config, workdir)
  if _MODE.value == "sample":
    sample.run(config, workdir)
  if _MODE.value == "eval":
    evaluate.run(config, workdir)
  if _MODE.value == "demo":
    paths, _ = demo.run(config, workdir)
    print("\nDemo samples (rows = classes):")
    for p in paths:
      print("  " + os.path.abspath(p))


def cli() -> None:
  """The `sgjax` console command (= python -m sgjax.main)."""
  errors.run(main)  # A user's error: one line, exit 2 (--verbose: with the traceback).


if __name__ == "__main__":
  cli()
