"""Moved to `sgjax.convert.dit_checkpoint` (installed with the package). This module keeps
`python -m third_party.dit_checkpoint` and `from third_party import dit_checkpoint` working
in a checkout."""

from sgjax.convert import dit_checkpoint as _module
from sgjax.convert.dit_checkpoint import *  # noqa: F403

if __name__ == "__main__":
  _module.cli()
