"""The Fashion-MNIST demo with masking (MaskDiT-style) in place of routing, for comparing the two
sparsity mechanisms under SG with the same training budget:

  python -m sgjax.main --config=configs/fashion_mnist_mask.py --workdir=DIR --mode=train
  python -m sgjax.jobs.sweep --config=configs/fashion_mnist_mask.py --workdir=DIR

Same encoder, data, optimizer and sampler as configs/fashion_mnist.py; the encoder sees 25 of
the 49 tokens in training (mask γ 0.5) and a 2-layer, width-96 decoder fills the rest.
"""

from sgjax.config import load_config_file


def get_config():
  c = load_config_file("fashion_mnist")
  c.model.update(decoder_depth=2, decoder_width=96, decoder_heads=4)
  c.sparsity.update(routes=(), mask_gamma=0.5)
  c.train.update(objective="masked", mask_loss_weight=0.1)  # MaskDiT's λ for its reconstruction.
  c.sample.guidance.update(rule="sg", omega=2.0, gamma_strong=0.0, gamma_weak=0.3)
  # Masked models tolerate less inference sparsity than routed ones: a lower γ_weak grid.
  c.sweep.update(gammas_weak=(0.2, 0.3, 0.5))
  return c
