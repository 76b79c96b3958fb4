"""Token sparsity as a call-time value: routes (TREAD) or masking (MaskDiT), and the token
gather/scatter they need.

`Sparsity` is frozen and hashable so it can be a static argument of `jax.jit`: each distinct
value compiles once, and every token count inside is a Python int (static shapes). A model is
trained with one mechanism (routes, or masking when it has a decoder: docs/masking.md) and
`with_gamma` moves that mechanism's γ, so guidance, FLOPs and sweeps speak one vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp

from sgjax import errors


@dataclasses.dataclass(frozen=True)
class Route:
  """Layers `start..end` (both inclusive) run on `N - int(N * gamma)` randomly chosen tokens."""

  start: int
  end: int
  gamma: float

  def num_keep(self, num_tokens: int) -> int:
    return num_tokens - int(num_tokens * self.gamma)


@dataclasses.dataclass(frozen=True)
class Sparsity:
  """The sparsity of one model evaluation. `Sparsity()` is the dense model.

  `mask_gamma` > 0 (masked models only): the encoder sees `N - int(N * mask_gamma)` random tokens
  and the decoder fills the rest with its mask token. Routes and masking never combine.
  """

  routes: tuple[Route, ...] = ()
  mask_gamma: float = 0.0

  @classmethod
  def dense(cls) -> Sparsity:
    return cls()

  @classmethod
  def from_routes(cls, routes: Iterable[Sequence[float] | Route]) -> Sparsity:
    """Builds from `Route`s or `(start, end, gamma)` triples (the config's spelling)."""
    out = []
    for r in routes:
      if not isinstance(r, Route):
        start, end, gamma = r
        r = Route(int(start), int(end), float(gamma))
      out.append(r)
    return cls(tuple(sorted(out, key=lambda r: r.start)))

  @classmethod
  def from_config(cls, sc) -> Sparsity:
    """From `config.sparsity`: its routes and mask_gamma (the training sparsity)."""
    return dataclasses.replace(cls.from_routes(sc.routes),
                               mask_gamma=float(sc.get("mask_gamma", 0.0)))

  @property
  def is_dense(self) -> bool:
    return all(r.gamma == 0.0 for r in self.routes) and self.mask_gamma == 0.0

  def with_gamma(self, gamma: float) -> Sparsity:
    """The same mechanism at another γ: how inference picks a branch's sparsity.

    With routes, every route takes γ (same layout); without routes the mechanism is masking, so
    γ becomes `mask_gamma` (a model without a decoder rejects that at call time).
    """
    if self.routes:
      return Sparsity(tuple(dataclasses.replace(r, gamma=float(gamma)) for r in self.routes))
    return Sparsity(mask_gamma=float(gamma))

  def mask_keep(self, num_tokens: int) -> int:
    """How many tokens a masked model's encoder sees."""
    return num_tokens - int(num_tokens * self.mask_gamma)

  def validate(self, depth: int, field: str = "sparsity.routes") -> None:
    if not 0.0 <= self.mask_gamma < 1.0:
      raise errors.UserError(f"sparsity.mask_gamma = {self.mask_gamma}", "must be in [0, 1)")
    if self.routes and self.mask_gamma > 0.0:
      raise errors.UserError(f"{field} = {tuple(self.routes)} with sparsity.mask_gamma = "
                             f"{self.mask_gamma}", "routes and masking together are not supported",
                             "use one mechanism (routes=() for a masked model)")
    prev_end = -1
    for i, r in enumerate(self.routes):
      if not 0 <= r.start <= r.end < depth:
        raise errors.UserError(
            f"{field}[{i}] = ({r.start}, {r.end})",
            f"route layers must satisfy 0 <= start <= end <= depth-1 = {depth - 1}")
      if not 0.0 <= r.gamma < 1.0:
        raise errors.UserError(f"{field}[{i}].gamma = {r.gamma}", "must be in [0, 1)")
      if r.start <= prev_end:
        raise errors.UserError(f"{field}[{i}]", f"starts at layer {r.start}, inside the previous "
                               f"route (ends at {prev_end})", "routes must not overlap")
      prev_end = r.end

  def route_starting_at(self, layer: int) -> Route | None:
    for r in self.routes:
      if r.start == layer and r.gamma > 0.0:
        return r
    return None

  def route_ending_at(self, layer: int) -> Route | None:
    for r in self.routes:
      if r.end == layer and r.gamma > 0.0:
        return r
    return None

  def tokens_at_layer(self, layer: int, num_tokens: int) -> int:
    """How many tokens (encoder) block `layer` processes (used by the FLOP counter)."""
    if self.mask_gamma > 0.0:
      return self.mask_keep(num_tokens)
    for r in self.routes:
      if r.start <= layer <= r.end:
        return r.num_keep(num_tokens)
    return num_tokens


DENSE = Sparsity()
# The named scope of the token selection, gather and scatter: profiles attribute time by it
# (sgjax.jobs.profiling).
ROUTE_SCOPE = "route"


def check_config(config) -> None:
  """The `sparsity` section against the model it thins: routes inside `model.depth`, and one
  mechanism, routes or (with a decoder, `model.decoder_depth` > 0) masking."""
  sc, depth, decoder = config.sparsity, config.model.depth, config.model.get("decoder_depth", 0)
  Sparsity.from_config(sc).validate(depth, "sparsity.routes")
  if decoder > 0 and sc.routes:
    raise errors.UserError(f"sparsity.routes = {sc.routes!r}", "a masked model "
                           "(model.decoder_depth > 0) thins tokens by masking "
                           "(sparsity.mask_gamma); routes and masking together are not supported")
  if decoder <= 0 and sc.mask_gamma != 0:
    raise errors.UserError(f"sparsity.mask_gamma = {sc.mask_gamma!r}", "masking needs a decoder",
                           "set model.decoder_depth > 0, or mask_gamma = 0")


def select_tokens(key: jax.Array, batch: int, num_tokens: int, num_keep: int) -> jax.Array:
  """Per-sample random subsets of `num_keep` token indices, shape (batch, num_keep).

  argsort of uniform noise gives a uniformly random permutation per sample; the indices are
  sorted so kept tokens stay in raster order (attention is permutation-equivariant, so this
  changes nothing numerically but makes gathers friendlier to memory).
  """
  with jax.named_scope(ROUTE_SCOPE):
    noise = jax.random.uniform(key, (batch, num_tokens))
    keep = jnp.argsort(noise, axis=1)[:, :num_keep]
    return jnp.sort(keep, axis=1)


def route_indices(sparsity: Sparsity, layer: int, token_key: jax.Array | None,
                  x: jax.Array) -> jax.Array | None:
  """The kept tokens (B, K) of the route starting at `layer` (None if none starts there), drawn
  from `fold_in(token_key, layer)`: every model routes with the same draw."""
  route = sparsity.route_starting_at(layer)
  if route is None:
    return None
  if token_key is None:
    raise ValueError("a routed forward pass needs token_key")  # The caller's bug.
  b, n = x.shape[:2]
  return select_tokens(jax.random.fold_in(token_key, layer), b, n, route.num_keep(n))


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x: (B, N, D), idx: (B, K) -> (B, K, D)."""
  with jax.named_scope(ROUTE_SCOPE):
    return jnp.take_along_axis(x, idx[:, :, None], axis=1)


def scatter_tokens(x_full: jax.Array, x_kept: jax.Array, idx: jax.Array) -> jax.Array:
  """Writes the processed kept tokens back into a copy of the route-start activations."""
  with jax.named_scope(ROUTE_SCOPE):
    batch_idx = jnp.arange(x_full.shape[0])[:, None]
    return x_full.at[batch_idx, idx].set(x_kept.astype(x_full.dtype))
