"""Shipped with the package as sgjax/configs/fashion_mnist_gpu.py:
`--config=fashion_mnist_gpu` finds it from any directory; this file keeps
`--config=configs/fashion_mnist_gpu.py` working in a checkout."""

from sgjax.configs.fashion_mnist_gpu import get_config  # noqa: F401
