"""The parameter table printed at start (clu's parameter_overview), without TensorFlow."""

import os
import subprocess
import sys

import jax
import numpy as np

from sgjax import metrics, models, sharding
from sgjax import state as state_lib
from tests.builders import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_table_of_abstract_params_lists_shapes_specs_and_total():
  c = tiny_config()
  mesh = sharding.build_mesh(dict(data=2, fsdp=2, tensor=2))
  abstract, _ = state_lib.abstract_state_and_shardings(models.from_config(c),
                                                   state_lib.make_optimizer(c.train), c.seed, mesh)
  table = metrics.parameter_overview(abstract["params"])
  rows = {line.split("|")[1].strip(): [f.strip() for f in line.split("|")[2:-1]]
          for line in table.splitlines() if line.startswith("| ")}
  # Width 64, 4×4 patches of 1 channel, 4 classes + ∅, depth 3: 41 leaves.
  assert len(rows) == 1 + 41
  assert rows["block0/attn/qkv/kernel"] == ["(64, 192)", "float32", "12,288",
                                            "('fsdp', 'tensor')"]
  assert rows["y_embed/embedding"] == ["(5, 64)", "float32", "320", "(None, 'fsdp')"]
  total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract["params"]))
  assert total == 255_440
  assert table.splitlines()[-1] == f"Total: {total:,} -- {4 * total:,} bytes"
  # max_lines bounds the printed lines (total included) and marks the cut.
  short = metrics.parameter_overview(abstract["params"], max_lines=10).splitlines()
  assert len(short) == 10 and short[7] == "[...]" and short[-1] == table.splitlines()[-1]


def test_metrics_module_does_not_import_tensorflow():
  # clu.metric_writers would; clu.parameter_overview must not (a training process has no TF).
  code = "import sys, sgjax.metrics; assert 'tensorflow' not in sys.modules, 'tensorflow'"
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
