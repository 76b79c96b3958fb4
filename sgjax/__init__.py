"""sgjax: token-sparse Diffusion Transformers and Sparse Guidance in JAX.

  import sgjax
  pipe = sgjax.load("workdirs/fashion_mnist_demo")   # a trained workdir or an exported file
  images = pipe(labels=[3, 7], rule="sg", omega=8.0, gamma=(0.0, 0.9), steps=30, seed=0)

`load` and `Pipeline` are sgjax.pipeline's (docs/python.md). They are imported on first use:
importing sgjax (or any of its modules) imports no jax, so a command can set XLA flags first.
"""

from typing import Any

__all__ = ["Pipeline", "load"]


def __getattr__(name: str) -> Any:
  if name in __all__:
    from sgjax import pipeline  # On first use (see above).
    return getattr(pipeline, name)
  raise AttributeError(f"module 'sgjax' has no attribute {name!r}")
