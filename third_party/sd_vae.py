"""Moved to `sgjax.convert.sd_vae` (installed with the package). This module keeps
`python -m third_party.sd_vae` and `from third_party import sd_vae` working
in a checkout."""

from sgjax.convert import sd_vae as _module
from sgjax.convert.sd_vae import *  # noqa: F403

if __name__ == "__main__":
  _module.cli()
