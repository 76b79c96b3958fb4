"""The Fashion-MNIST demo sized for one GPU: the quality-vs-compute sweep at 5,000 samples a point.

`bash launch/gpu_sweep.sh` trains it and runs the sweep in one device call (docs/results.md).
Patch 2 on 28x28 -> 196 tokens; route 2->4 of 8 layers at γ=0.5: TREAD's absolute rule (start 2,
end depth-4), which its ablation found best, leaving blocks 5-7 dense. bf16 compute, fp32 master
weights, as on ImageNet.
"""

from sgjax.config import base_config


def get_config():
  c = base_config()
  c.dtype = "bfloat16"
  c.model.update(preset="", depth=8, width=256, heads=4, patch_size=2, mlp_ratio=4.0)
  # Grain workers keep 256-image batches ahead of a step this small. On a device machine,
  # gpu_sweep.sh points data.dir at the idx files carried in the checkout (`make device-data`).
  c.data.update(name="fashion_mnist", image_size=28, channels=1,
                num_classes=10, worker_count=8)
  c.sparsity.routes = ((2, 4, 0.5),)
  c.train.update(batch_size=256, num_steps=10000, lr=5e-4, warmup_steps=500, grad_clip=1.0,
                 ema_decay=0.9995, ema_warmup=True, label_dropout=0.1, log_every=500,
                 checkpoint_every=2500)
  c.sample.update(steps=30, sampler="euler", batch_size=1000, per_class=8)
  c.sample.guidance.update(rule="sg", omega=2.0, gamma_strong=0.0, gamma_weak=0.5)
  # 500 per class = 5,000 samples a point, scored against the 10,000 test images.
  c.sweep.update(rules=("cfg", "sg"), omegas=(1.5, 2.0, 3.0, 4.0),
                 gammas_strong=(0.0,), gammas_weak=(0.3, 0.5, 0.7, 0.9), steps=(30,),
                 per_class=500)
  c.eval.update(feature_net="fmnist", num_samples=5000)
  return c
