"""`python -m sgjax.study`: the SG-vs-CFG study. Its code is `sgjax.jobs.study` (a job)."""

from sgjax.jobs import study as _job

if __name__ == "__main__":
  _job.cli()
