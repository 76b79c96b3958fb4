"""Entry point: flags -> config -> mode. Nothing else lives here.

  python -m sgjax.main --config=configs/fashion_mnist.py --workdir=DIR [--mode=train|sample|demo]
      [--config.train.num_steps=...]
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and samples go here.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "demo"],
                          "train: train (resuming from workdir); sample: write grids and .npz "
                          "with config.sample.guidance; demo: train, then sample and score CFG "
                          "and SG.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  del argv
  # Orbax and grain log every save at INFO; the console shows our progress lines instead.
  logging.set_verbosity(logging.WARNING)
  from sgjax import platform
  platform.set_default_xla_flags(sampling=_MODE.value == "sample")
  import jax  # Local: XLA flags must be in place first.

  from sgjax import config as config_lib
  from sgjax import sampling_job, train

  config = _CONFIG.value
  workdir = _WORKDIR.value
  config_lib.validate(config, jax.device_count())
  if _MODE.value in ("train", "demo"):
    train.train(config, workdir)
  if _MODE.value == "sample":
    sampling_job.run(config, workdir)
  if _MODE.value == "demo":
    paths, _ = sampling_job.demo(config, workdir)
    print("\nDemo samples (rows = classes):")
    for p in paths:
      print("  " + os.path.abspath(p))


if __name__ == "__main__":
  app.run(main)
