"""The condition a model is given, as a pytree: class labels (B,) or text {"text", "text_mask"}.

Training (condition dropout), guidance (the unconditional branch) and sampling see the condition
only through these functions, so CFG / SG / CFG+SG / AG+SG and the train step run unchanged for
the class-conditional DiT and the text-conditional TR-DiT. The *null* condition (CFG's ∅) is an
int for class labels (the extra "null class" row of the label embedding) or a pytree of the
condition's structure without the batch axis for text (the empty prompt's features).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Condition = Any  # jax.Array (B,) int labels, or {"text": (B, L, D), "text_mask": (B, L)}.
Null = Any  # int null label, or the condition of one example without its batch axis.


def from_batch(batch: dict[str, Any]) -> Condition:
  """The condition part of a data batch."""
  if "text" in batch:
    return {"text": batch["text"], "text_mask": batch["text_mask"]}
  return batch["label"]


def batch_size(cond: Condition) -> int:
  return jax.tree.leaves(cond)[0].shape[0]


def null_like(cond: Condition, null: Null) -> Condition:
  """The null condition broadcast to `cond`'s batch (and dtypes)."""
  if isinstance(null, int):
    return jnp.full_like(cond, null)
  return jax.tree.map(lambda c, n: jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape), cond, null)


def where(drop: jax.Array, null: Condition, cond: Condition) -> Condition:
  """Per example: `null` where drop (B,) is True, else `cond`."""
  def pick(n, c):
    return jnp.where(drop.reshape(drop.shape + (1,) * (c.ndim - 1)), n, c)
  return jax.tree.map(pick, null, cond)


def concat(a: Condition, b: Condition) -> Condition:
  """Two conditions as one batch (a first): CFG's dense branches share one forward."""
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def example(model, batch: int) -> Condition:
  """Zeros of the shapes `model` is conditioned on (what init traces with)."""
  return model.example_condition(batch)


def is_labels(cond: Condition) -> bool:
  """Class labels (one int array) rather than a text pytree."""
  return not isinstance(cond, dict)


def default_null(model) -> Null:
  """The null a model defines by itself: DiT's null label. Text models have none: their null is
  the empty prompt's features, which come with the data (sgjax.data.captions.null_condition)."""
  null = model.builtin_null()
  if null is None:  # A Python caller's omission (the jobs pass the prompt's null): a bug.
    raise ValueError(f"{type(model).__name__} has no built-in null condition: pass the empty "
                     "prompt's features (sgjax.data.captions.null_condition)")
  return null


def synthetic(model, batch: int, key: jax.Array, num_classes: int = 1) -> Condition:
  """Random conditions of `model`'s shapes (benchmarks): labels < num_classes, or random text
  features with 2..L real tokens."""
  # Shapes only: the pre-flight calls this with no device able to run a computation.
  ex = jax.eval_shape(lambda: model.example_condition(batch))
  if is_labels(ex):
    return jax.random.randint(key, (batch,), 0, num_classes)
  k1, k2 = jax.random.split(key)
  length = jax.random.randint(k2, (batch, 1), 2, ex["text_mask"].shape[1] + 1)
  return {"text": jax.random.normal(k1, ex["text"].shape),
          "text_mask": jnp.arange(ex["text_mask"].shape[1])[None] < length}


def synthetic_null(model) -> Null:
  """A stand-in null for benchmarks: the model's own, or zero features with [CLS] [SEP] only."""
  ex = jax.eval_shape(lambda: model.example_condition(1))  # Shapes only, as in `synthetic`.
  if is_labels(ex):
    return default_null(model)
  return {"text": jnp.zeros(ex["text"].shape[1:], ex["text"].dtype),
          "text_mask": jnp.arange(ex["text_mask"].shape[1]) < 2}
