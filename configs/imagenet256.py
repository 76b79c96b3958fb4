"""Shipped with the package as sgjax/configs/imagenet256.py:
`--config=imagenet256` finds it from any directory; this file keeps
`--config=configs/imagenet256.py` working in a checkout."""

from sgjax.configs.imagenet256 import get_config  # noqa: F401
