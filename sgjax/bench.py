"""`python -m sgjax.bench`: the benchmarks. Their code is `sgjax.jobs.bench` (a job)."""

from sgjax.jobs import bench as _job
from sgjax.jobs.bench import *  # noqa: F403  (the old import path keeps working)

if __name__ == "__main__":
  _job.cli()
