"""Shipped with the package as sgjax/configs/t2i_2p5b.py:
`--config=t2i_2p5b` finds it from any directory; this file keeps
`--config=configs/t2i_2p5b.py` working in a checkout."""

from sgjax.configs.t2i_2p5b import get_config  # noqa: F401
