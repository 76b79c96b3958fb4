"""The SG-vs-CFG study (issue 16, docs/results.md): the demo model trained for an hour.

The demo's model, route and optimiser (`fashion_mnist.py`), trained 6000 steps instead of 1200
(about an hour with its dense twin training beside it on a 2-core CPU), keeping every 1000th
checkpoint: the study compares the guidance rules at each of them (the paper's Fig. 5) and
AG+SG takes its weak branch from an earlier one. The dense twin is the same config with
`--config.sparsity.routes="()" --config.sample.guidance.rule=cfg`.
"""

from sgjax.configs import fashion_mnist


def get_config():
  c = fashion_mnist.get_config()
  c.train.update(num_steps=6000, checkpoint_every=500, keep_period=1000, log_every=100)
  return c
