"""`python -m sgjax.jobs.study`."""

from sgjax.jobs.study.job import cli

if __name__ == "__main__":
  cli()
