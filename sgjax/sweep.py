"""`python -m sgjax.sweep`: the guidance sweep. Its code is `sgjax.jobs.sweep` (a job)."""

from sgjax.jobs import sweep as _job
from sgjax.jobs.sweep import *  # noqa: F403  (the old import path keeps working)

if __name__ == "__main__":
  _job.cli()
