"""Shipped with the package as sgjax/configs/fashion_mnist_study.py:
`--config=fashion_mnist` finds it from any directory; this file keeps
`--config=configs/fashion_mnist_study.py` working in a checkout."""

from sgjax.configs.fashion_mnist_study import get_config  # noqa: F401
