"""Shipped with the package as sgjax/configs/fashion_mnist_mask.py:
`--config=fashion_mnist_mask` finds it from any directory; this file keeps
`--config=configs/fashion_mnist_mask.py` working in a checkout."""

from sgjax.configs.fashion_mnist_mask import get_config  # noqa: F401
