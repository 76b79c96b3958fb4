"""TR-DiT-2.5B, the paper's text-to-image model (method notes, "Text-to-image model").

34 layers, width 2048, 16 heads (head dim 128), SwiGLU 8/3, route 2→30 at γ=0.5; 512² images as
64×64×4 SD-VAE latents with patch 2 (1024 tokens); AdamW 5e-5, β (0.9, 0.95), batch 3072; 50
Euler steps. The text encoder here is a stand-in width: the paper used a 2B vision-language
model; any encoder behind sgjax.text.encoder's interface plugs in with its own `text.width`.
"""

from sgjax.config import base_config


def get_config():
  c = base_config()
  c.dtype = "bfloat16"
  c.model.update(kind="trdit", preset="", depth=34, width=2048, heads=16, patch_size=2,
                 mlp_ratio=8.0 / 3.0, remat="dots")
  c.text.update(encoder="minilm", width=2304, max_tokens=128, layers=2)
  # 512² pixels -> 64×64×4 latents (SD-VAE, factor 8); the latent pipeline is sgjax.data.latents.
  c.data.update(name="synthetic", image_size=64, channels=4, num_classes=1)
  c.sparsity.routes = ((2, 30, 0.5),)
  c.train.update(batch_size=3072, num_steps=500_000, lr=5e-5, b1=0.9, b2=0.95,
                 weight_decay=0.0, warmup_steps=1000, grad_clip=1.0, ema_decay=0.9999,
                 # The empty prompt's rate (CFG's ∅); it once sat in a `text.dropout` that nothing
                 # read, so training had none.
                 label_dropout=0.1, log_every=100, checkpoint_every=5000)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.sample.update(steps=50, sampler="euler", time_shift=1.0, batch_size=64, per_class=4)
  c.sample.guidance.update(rule="sg", omega=3.0, gamma_strong=0.0, gamma_weak=0.5)
  return c
