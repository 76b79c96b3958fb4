"""`python -m sgjax.text.demo --config=configs/fashion_mnist_t2i.py --workdir=DIR [--rules=…]`.

The text-to-image demo: held-out prompts with CFG, SG and CFG+SG, scored with the FD-FMNIST
classifier. Its code is `sgjax.jobs.demo` (`run_text`); a job entry, imported by no core module.
"""

from sgjax.jobs import demo as _job
from sgjax.jobs.demo import prompt_batch  # noqa: F401
from sgjax.jobs.demo import run_text as run  # noqa: F401

if __name__ == "__main__":
  _job.text_cli()
