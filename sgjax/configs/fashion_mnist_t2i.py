"""Text-to-image demo: a small TR-DiT on Fashion-MNIST with captions, sized for a 2-core CPU.

  python -m sgjax.tools.encode_text --config=configs/fashion_mnist_t2i.py   # once: MiniLM features
  python -m sgjax.main --config=configs/fashion_mnist_t2i.py --workdir=DIR --mode=train
  python -m sgjax.t2i --config=configs/fashion_mnist_t2i.py --workdir=DIR  # CFG / SG / CFG+SG

Captions come from the class names with `text.templates`; evaluation prompts use
`text.eval_templates`, wording never seen in training. 28×28, patch 4 -> 49 tokens; route 1->4
at γ=0.5 as in the class-conditional demo.
"""

from sgjax.config import base_config


def get_config():
  c = base_config()
  c.dtype = "float32"  # bf16 buys nothing on CPU.
  c.model.update(kind="trdit", preset="", depth=6, width=128, heads=4, patch_size=4,
                 mlp_ratio=8.0 / 3.0)
  c.text.update(encoder="minilm", width=384, max_tokens=16, layers=1, templates=(
      "a photo of {}",
      "{}, product shot",
      "a picture of {}",
      "{} on a white background",
      "a black and white photo of {}",
      "a catalogue image of {}",
      "{}",
      "a small grayscale picture of {}",
  ), eval_templates=(
      "an image showing {}",
      "here is {}, photographed for an online shop",
      "someone is selling {}",
      "a low resolution scan of {}",
  ))
  c.data.update(name="fashion_mnist_captions", image_size=28, channels=1, num_classes=10)
  c.sparsity.routes = ((1, 4, 0.5),)
  c.train.update(batch_size=32, num_steps=1000, lr=1e-3, warmup_steps=100, grad_clip=1.0,
                 ema_decay=0.999, ema_warmup=True, label_dropout=0.1, log_every=50,
                 checkpoint_every=500)
  c.sample.update(steps=30, sampler="euler", batch_size=80, per_class=8)
  c.sample.guidance.update(rule="sg", omega=2.0, gamma_strong=0.0, gamma_weak=0.5)
  c.demo.update(omega_cfg=2.0, omega_sg=2.0, eval_per_class=16)
  return c
