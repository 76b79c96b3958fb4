"""SG under the paper's routing share (issue 22, docs/results.md): a deep, mostly-routed model.

Why this model: the paper routes SiT-XL/2's blocks 2->24 of 28, so a token the weak branch drops
at γ_w 0.9 skips 23 of 28 blocks (82%) and that branch costs about a quarter of a dense pass. The
6-block demo model routes 1->3 (50%): its weak branch nearly equals its strong one (first study,
‖ΔSG‖ a tenth of ‖ΔCFG‖), and a 6-block net cannot have both the paper's share and dense blocks
around the route. Depth 12 can:

- `route` (default here): blocks **1->10** of 12 at γ 0.5 (10 of 12 blocks, 83%; one dense block
  before the route and one after), the paper's share;
- TREAD's placement rule (start 2, end depth-4): `--config.sparsity.routes="((2,8,0.5),)"` (58%);
- the dense twin: `--config.sparsity.routes="()" --config.sample.guidance.rule=cfg`.

Width 128, 4 heads, patch 4 (49 tokens), the demo's optimiser (batch 32, lr 1e-3 with warmup,
EMA 0.999, label dropout 0.1). The three are trained at once on the 2-core CPU for the same
wall-clock time, stopped by SIGTERM (a checkpoint is written; rerunning resumes), so they get
equal compute, not equal steps; every 500th checkpoint is kept for the probe, the study over
training and AG+SG's guide. No sample grids while training (they would take wall-clock time from
the fixed budget; the study draws them). `num_steps` is only an upper bound.
"""

from sgjax.configs import fashion_mnist_study


def get_config():
  c = fashion_mnist_study.get_config()
  c.model.update(depth=12, width=128, heads=4, patch_size=4, mlp_ratio=4.0)
  c.sparsity.routes = ((1, 10, 0.5),)
  c.train.update(num_steps=100_000, checkpoint_every=500, keep_period=500, log_every=100,
                 sample_every=0)
  # The fair comparison (docs/study.md, search "budget"), sized for what is left of a 2-core
  # session: budgets = CFG's cost at 8, 12 and 20 Euler steps, every point at the most steps
  # within its budget; at the middle one ω × γ_w jointly for SG (γ_w brackets 0.9: 0.95 is in),
  # CFG's ω × interval, each rule's best with a guidance interval, ω pushed past the grid's edge
  # where the best sits on it; γ_s fixed at 0 (the first study: best at every γ_w). SG and CFG
  # (final_families) are refit and rescored at all three budgets; unguided and the dense twin
  # at the middle one. 100 samples a screening point, 2,000 a final one. CFG+SG, AG+SG and
  # autoguidance are left out here (rules): the first study measured them, and a 2-core session
  # could not also afford their grids and finals (add them to `rules` on a bigger machine).
  c.study.update(search="budget", steps=(8, 12, 20), budgets=(), per_class=10,
                 final_per_class=200, bootstrap=300, cfg_omegas=(1.5, 2.0, 3.0),
                 cfg_intervals=((0.25, 1.0),),
                 omegas=(2.0, 4.0, 8.0, 12.0), gammas_strong=(0.0,),
                 gammas_weak=(0.5, 0.7, 0.9, 0.95), unguided_gammas=(0.0,), top_settings=1,
                 rules=("cfg", "sg"), final_families=("cfg", "sg"),
                 probe_gammas=(0.0, 0.9),
                 probe_routes=((1, 10, 0.5),), probe_images=100, probe_draws=2)
  return c
