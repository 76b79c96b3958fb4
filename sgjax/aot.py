"""`python -m sgjax.aot`: the TPU pre-flight (sgjax.preflight.job; docs/scaling.md).

  python -m sgjax.aot --config=configs/imagenet256.py --topology=v5p-64 [--mode=train] …
"""

import os

# Before jax is imported: compile for the TPU topology from a CPU host process, whatever
# accelerators this machine has (a pre-flight on a TPU VM must not take its chips).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from sgjax.preflight import job  # noqa: E402  (after the platform is set)

if __name__ == "__main__":
  job.cli()
