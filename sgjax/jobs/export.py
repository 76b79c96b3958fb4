"""`sgjax-export --workdir=DIR [--step=N] --layout=sit|dit|sgjax --out=FILE.safetensors`.

Writes a workdir's EMA weights as a safetensors file (python -m sgjax.jobs.export). The layouts,
the metadata and what cannot be exported: sgjax.export; where the files go next:
docs/python.md.
"""

from __future__ import annotations

import numpy as np
from absl import flags, logging

from sgjax import errors, export, pipeline


def run(workdir: str, layout: str, out: str, *, step: int | None = None, config=None,
        learn_sigma: bool = True) -> dict[str, np.ndarray]:
  """Exports the EMA weights of `workdir` (its checkpoint `step`, default the latest) to `out`;
  the tensors written."""
  import jax  # Local: after flags are parsed.
  if jax.process_count() > 1:
    raise errors.UserError("export", "runs in one process", "run sgjax-export on one host")
  export.check_out(out)  # Before reading anything.
  errors.check(layout in export.LAYOUTS, "--layout", layout, f"allowed: {export.LAYOUTS}")
  pipe = pipeline.load(workdir, step=step, ema=True, config=config)
  export.check_layout(pipe.config, layout)  # Before fetching the weights.
  params = jax.device_get(pipe.params)
  return export.write(out, params, pipe.config, layout, pipe.step, learn_sigma=learn_sigma)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO.
  f = flags.FLAGS
  arrays = run(f.workdir, f.layout, f.out, step=f.step, config=f.config,
               learn_sigma=f.learn_sigma)
  n = sum(int(np.prod(a.shape)) for a in arrays.values())
  print(f"{f.out}: {f.layout} layout, {len(arrays)} tensors, {n / 1e6:.2f}M numbers (EMA "
        f"weights of {f.workdir})")


def cli() -> None:
  """The `sgjax-export` command (flags defined here, only for this command)."""
  flags.DEFINE_string("workdir", None, "The trained workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("layout", None, list(export.LAYOUTS),
                    "sit / dit: the official SiT/DiT state dict; sgjax: our parameter tree.")
  flags.DEFINE_string("out", None, "The .safetensors file to write (must not exist).")
  from ml_collections import config_flags  # Local: defines a flag, only for this command.
  config_flags.DEFINE_config_file("config", None, "Config file (default: the workdir's record, "
                                  "workdir.json).", lock_config=False)
  flags.DEFINE_bool("learn_sigma", True, "sit/dit: 2C output channels per pixel (the variance "
                    "half zero), as DiT/SiT build their models by default.")
  flags.mark_flags_as_required(["workdir", "layout", "out"])
  errors.run(main)


if __name__ == "__main__":
  cli()
