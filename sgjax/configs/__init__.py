"""The shipped config files, one `get_config()` each, found by name from any directory.

`--config=fashion_mnist`, `--config=fashion_mnist.py` and `--config=configs/fashion_mnist.py`
all name sgjax/configs/fashion_mnist.py unless that path exists where the command runs (a user's
own config file always wins).
"""

from __future__ import annotations

import os

DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """The shipped configs' names."""
  return sorted(n[:-3] for n in os.listdir(DIR) if n.endswith(".py") and n != "__init__.py")


def resolve(path: str) -> str:
  """`path` when it exists; else the shipped config its file name names; else `path` (whose
  loading then fails, naming it)."""
  if os.path.exists(path):
    return path
  name = os.path.basename(path).removesuffix(".py")
  return os.path.join(DIR, name + ".py") if name in names() else path
