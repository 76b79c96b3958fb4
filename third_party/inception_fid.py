"""Moved to `sgjax.convert.inception_fid` (installed with the package). This module keeps
`python -m third_party.inception_fid` and `from third_party import inception_fid` working
in a checkout."""

from sgjax.convert import inception_fid as _module
from sgjax.convert.inception_fid import *  # noqa: F403

if __name__ == "__main__":
  _module.cli()
