"""Shipped with the package as sgjax/configs/fashion_mnist_t2i.py:
`--config=fashion_mnist_t2i` finds it from any directory; this file keeps
`--config=configs/fashion_mnist_t2i.py` working in a checkout."""

from sgjax.configs.fashion_mnist_t2i import get_config  # noqa: F401
