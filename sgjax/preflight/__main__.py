"""`python -m sgjax.preflight`: the same command as `python -m sgjax.aot`."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Before jax is imported: as sgjax/aot.py.

from sgjax.preflight import job  # noqa: E402  (after the platform is set)

if __name__ == "__main__":
  job.cli()
