"""ImageNet-256 with masking (MaskDiT-style) instead of routing: the paper's masked baseline.

Everything as configs/imagenet256.py (SiT-XL/2 encoder on SD-VAE latents, optimizer, EMA,
sampler) except the sparsity mechanism: the encoder sees half the tokens in training, a MaskDiT
decoder (8 layers, width 512, 16 heads) fills the rest with a learned mask token, and the loss
adds λ = train.mask_loss_weight times the masked-token reconstruction term (docs/masking.md).
"""

from sgjax.config import load_config_file


def get_config():
  c = load_config_file("imagenet256")
  c.model.update(decoder_depth=8, decoder_width=512, decoder_heads=16)
  c.sparsity.update(routes=(), mask_gamma=0.5)
  # MaskDiT's weight for its reconstruction (MAE) term; the SG paper gives none.
  c.train.update(objective="masked", mask_loss_weight=0.1)
  # Masked models tolerate little inference sparsity (paper: γ_s <~ 0.12, γ_w ~ 0.2-0.3).
  c.sample.guidance.update(rule="sg", omega=1.5, gamma_strong=0.1, gamma_weak=0.3)
  return c
