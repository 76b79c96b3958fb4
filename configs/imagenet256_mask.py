"""Shipped with the package as sgjax/configs/imagenet256_mask.py:
`--config=imagenet256_mask` finds it from any directory; this file keeps
`--config=configs/imagenet256_mask.py` working in a checkout."""

from sgjax.configs.imagenet256_mask import get_config  # noqa: F401
