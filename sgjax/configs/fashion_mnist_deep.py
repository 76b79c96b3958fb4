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
  return c
