"""ImageNet-256 recipe of the Sparse Guidance paper: SiT-XL/2 on SD-VAE latents, route 2->24."""

from sgjax.config import base_config


def get_config():
  c = base_config()
  c.dtype = "bfloat16"
  c.model.preset = "XL/2"
  # 256x256 images -> 32x32x4 SD-VAE latents (scale 0.18215), written by
  # `python -m sgjax.tools.encode_latents` (docs/imagenet.md) into data.dir.
  c.data.name = "latents"
  c.data.dir = "data/imagenet256_latents"
  c.data.image_size = 32
  c.data.channels = 4
  c.data.num_classes = 1000
  # sd-vae-ft-ema (the vae.* defaults); pass its diffusers safetensors file as vae.weights.
  c.encode.update(source="folder", image_size=256, flip=True, batch_size=64, shard_size=4096)
  c.sparsity.routes = ((2, 24, 0.5),)
  c.train.update(batch_size=256, num_steps=2_000_000, lr=1e-4, b1=0.9, b2=0.999,
                 weight_decay=0.0, ema_decay=0.9999, label_dropout=0.1,
                 log_every=100, checkpoint_every=10_000)
  c.sample.update(steps=40, sampler="euler", batch_size=256)
  c.sample.guidance.update(rule="sg", omega=1.5, gamma_strong=0.5, gamma_weak=0.9)
  return c
