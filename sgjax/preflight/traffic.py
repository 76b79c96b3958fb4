"""The HBM traffic a step cannot avoid, counted from its own program: what the estimate's HBM
term uses.

XLA's cost analysis reports "bytes accessed", a sum over the operations it costs that is no
HBM figure: for SiT-XL/2's train step on v5e-8 it is 222 GB per chip per step, about 4× the
count below, and an estimate built on it called compute-bound steps HBM-bound
(docs/scaling.md). This count is a floor instead, in three parts, per chip:

  weights      every matmul's weight operand read (forward, backward, recomputation under
               `model.remat`, each micro-batch of `train.grad_accum`) and each weight gradient
               written, at the full size FSDP gathers them to (÷ `mesh.tensor`)
  activations  every other matmul operand and result once: the saved activations written in the
               forward and read back by the backward, the gradients flowing through it, and
               XLA's attention scores (written by QKᵀ, read by PV); element-wise work (norms,
               modulation, activations, the loss) is taken to fuse into the matmul beside it
  state        the train state's shard read and written once by the update (params, EMA, AdamW
               moments, fp32) and the gradient shard read (0 for a sampling step)

Matmuls are the `dot_general`s (and convolutions) of the step's jaxpr, traced at one chip's
batch (no compile): weights and activations are told apart by tracing at two batch sizes, the
part that does not grow with the batch being the weights'. A real program moves more (fusions
that do not form, layout copies, collectives' buffers); XLA's count is shown beside this one as
the ceiling.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Traffic:
  """Bytes per chip per call."""
  weights: float
  activations: float
  state: float

  @property
  def total(self) -> float:
    return self.weights + self.activations + self.state

  def as_dict(self) -> dict[str, float]:
    return dict(weights=self.weights, activations=self.activations, state=self.state,
                total=self.total)


MATMULS = ("dot_general", "conv_general_dilated")  # A patch embedding is a convolution.


def _nbytes(aval) -> int:
  if not hasattr(aval, "shape") or not hasattr(aval, "dtype"):
    return 0
  try:
    itemsize = jnp.dtype(aval.dtype).itemsize
  except TypeError:  # PRNG key data and other extended dtypes: no matmul touches them.
    return 0
  return math.prod(aval.shape) * itemsize


def _sub_jaxprs(eqn) -> list[tuple[Any, int]]:
  """(jaxpr, times it runs) of each program nested in `eqn`: a scan's body runs `length`
  times, a cond's costliest branch once, any other call once."""
  if eqn.primitive.name == "cond":
    branches = eqn.params["branches"]
    return [(max(branches, key=lambda b: matmul_bytes(b.jaxpr)), 1)]
  times = int(eqn.params["length"]) if eqn.primitive.name == "scan" else 1
  out = []
  for value in eqn.params.values():
    for v in value if isinstance(value, tuple | list) else (value,):
      inner = getattr(v, "jaxpr", v)
      if hasattr(inner, "eqns"):
        out.append((inner, times))
  return out


def matmul_bytes(jaxpr) -> int:
  """Operand and result bytes of every matmul (and convolution) in `jaxpr`, nested programs
  included (a loop body times its trips)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in MATMULS:
      total += sum(_nbytes(v.aval) for v in (*eqn.invars, *eqn.outvars))
    for inner, times in _sub_jaxprs(eqn):
      total += times * matmul_bytes(inner)
  return total


def split_by_batch(traced_bytes: Callable[[int], int], batch: int) -> tuple[float, float]:
  """(weight bytes, activation bytes) at `batch` from a count that is affine in the batch:
  traced at `batch` and at twice it, the part that does not grow is the weights'."""
  at_b, at_2b = traced_bytes(batch), traced_bytes(2 * batch)
  activations = float(at_2b - at_b)
  return float(at_b) - activations, activations


def per_chip_bytes(abstract_state: Any) -> int:
  """Bytes one chip holds of a tree of sharded abstract arrays (its shards)."""
  return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * jnp.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(abstract_state) if hasattr(a, "sharding"))


def train_traffic(step_jaxpr_at: Callable[[int], Any], batch_per_chip: int, tensor: int,
                  state_shard_bytes: int, grad_shard_bytes: int) -> Traffic:
  """The train step's floor per chip. `step_jaxpr_at(b)`: the step's jaxpr at b images (one
  chip's); `state_shard_bytes`: the chip's shard of the whole state; `grad_shard_bytes`: of
  the fp32 gradients."""
  weights, activations = split_by_batch(lambda b: matmul_bytes(step_jaxpr_at(b).jaxpr),
                                        batch_per_chip)
  return Traffic(weights / tensor, activations / tensor,
                 2.0 * state_shard_bytes + grad_shard_bytes)


def sample_traffic(step_jaxpr_at: Callable[[int], Any], batch_per_chip: int,
                   tensor: int) -> Traffic:
  """A sampling step's floor per chip: its matmuls only (the weights are read, not updated)."""
  weights, activations = split_by_batch(lambda b: matmul_bytes(step_jaxpr_at(b).jaxpr),
                                        batch_per_chip)
  return Traffic(weights / tensor, activations / tensor, 0.0)
