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
  # Sized for a 2-core CPU (about an hour for the whole study): Euler at 8-24 steps, 150
  # samples a screening point, 2,000 for the matched comparison at CFG's cost at 12 steps
  # (3.30 GMACs/image; the budget is a hair above it so that point itself qualifies).
  c.sample.batch_size = 160
  c.study.update(per_class=15, final_per_class=200, bootstrap=300, steps=(8, 12, 16, 24),
                 steps_ref=12, omega_ref=3.0, cfg_omegas=(1.25, 1.5, 2.0, 3.0, 4.0),
                 cfg_intervals=((0.25, 1.0),), omegas=(1.5, 2.0, 4.0, 6.0, 8.0, 12.0),
                 gammas_strong=(0.0, 0.1, 0.2, 0.3, 0.5), gammas_weak=(0.6, 0.7, 0.8, 0.9),
                 unguided_gammas=(0.0, 0.25, 0.5, 0.75, 0.9), budgets=(3.31,),
                 probe_images=200, probe_draws=2)
  return c
