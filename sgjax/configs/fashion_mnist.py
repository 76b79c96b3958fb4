"""The demo: a small routed SiT on Fashion-MNIST, sized for a few minutes of a 2-core CPU.

28x28x1 images, patch 4 -> 49 tokens; route 1->3 at γ=0.5, so layers 1..3 of 6 run on 25 tokens
while training and blocks 4 and 5 always see every token. TREAD's placement scaled to 6 layers:
its DiT-B/2 ablation puts the best route at 2->8 of 12 (start 2, end depth-4: 3 dense blocks after)
and finds a late-ending 0->10 worse than no routing; one dense block after the route (our earlier
1->4) left 44 of 49 tokens of an SG weak branch at γ 0.9 seeing only blocks 0 and 5.
"""

from sgjax.config import base_config


def get_config():
  c = base_config()
  c.dtype = "float32"  # bf16 buys nothing on CPU.
  c.model.update(preset="", depth=6, width=192, heads=6, patch_size=4, mlp_ratio=4.0)
  c.data.update(name="fashion_mnist", image_size=28, channels=1, num_classes=10)
  c.sparsity.routes = ((1, 3, 0.5),)
  # 1200 steps of 32 images take 8-10 minutes of a 2-core CPU (2.1-2.6 steps/s) and give
  # recognisable classes; a high lr with warmup and a ramped EMA make so short a run usable.
  c.train.update(batch_size=32, num_steps=1200, lr=1e-3, warmup_steps=100, grad_clip=1.0,
                 ema_decay=0.999, ema_warmup=True, label_dropout=0.1, log_every=50,
                 checkpoint_every=500)
  # 30 Euler steps (ImageNet uses 40) for SG, whose cost the demo's unguided and CFG samples are
  # matched to. Guidance weights and SG's γ pair are the best the study found for each rule
  # (docs/results.md, 2026-12-02: SG ω 8 at γ 0/0.9; CFG ω 1.5, the lowest it tried but 1.25).
  c.sample.update(steps=30, sampler="euler", batch_size=80, per_class=8)
  c.sample.guidance.update(rule="sg", omega=8.0, gamma_strong=0.0, gamma_weak=0.9)
  c.demo.update(omega_cfg=1.5, omega_sg=8.0, eval_per_class=16)
  c.sweep.update(rules=("cfg", "sg"), omegas=(1.5, 2.0, 3.0), gammas_strong=(0.0,),
                 gammas_weak=(0.3, 0.5, 0.7), steps=(30,), per_class=16)
  # --mode=eval scores with the demo classifier (no Inception weights on these machines).
  c.eval.update(feature_net="fmnist", num_samples=1000)
  return c
