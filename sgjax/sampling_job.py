"""The old home of `--mode=sample` and the demo (the Colab notebook calls `demo`).

Sampling is `sgjax.jobs.sample`, the demo `sgjax.jobs.demo`, restoring weights `sgjax.state`
and the generation path `sgjax.generate`. A job entry: no core module imports this.
"""

from sgjax.generate import load_weights, write_samples  # noqa: F401
from sgjax.jobs.demo import run as demo  # noqa: F401
from sgjax.jobs.sample import run  # noqa: F401
from sgjax.state import restore_params as load_params  # noqa: F401
