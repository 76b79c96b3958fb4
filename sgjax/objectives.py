"""Training objectives: what the train step differentiates, picked by `train.objective`.

An objective is two pure functions (`Objective`), and the train step (sgjax.train) calls them
and owns everything else (gradients, accumulation, clipping, EMA, sharding):

  draw(model, batch, key, config, null) -> (inputs, loss_key)
      The per-example randomness of the whole global batch (time, noise, condition dropout),
      drawn before any micro-batch split so that gradient accumulation of a dense model
      reproduces the full-batch step. `inputs` is a pytree whose every leaf has the batch's
      leading axis (the step splits it into micro-batches); `loss_key` is what the loss draws
      the rest from (token subsets); the step folds the micro-batch index into it.
  loss(model, params, inputs, rng, config) -> (loss, aux)
      A scalar to minimise and a dict of scalar metrics (means over the micro-batch; the step
      averages them over micro-batches and reports them beside `loss`).

Flow matching (`flow`) and MaskDiT's masked objective (`masked`) are the first two. To add one
(a REPA-style alignment term, a distillation teacher, another time sampler): write its `draw`
(or reuse `draw_flow`) and `loss` here, add it to OBJECTIVES, and refuse the models or configs it
cannot train in `check_config` (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections

from sgjax import condition, errors, flow, models
from sgjax.sparsity import Sparsity

Metrics = dict[str, jax.Array]


class FlowInputs(NamedTuple):
  """A batch on the straight path: data, its noise and time, and the (dropped-out) condition.
  Field order is the order the step splits them in (part of the step's program)."""
  image: jax.Array
  noise: jax.Array
  t: jax.Array
  condition: condition.Condition


class Objective(NamedTuple):
  draw: Callable[..., tuple[Any, jax.Array]]
  loss: Callable[..., tuple[jax.Array, Metrics]]


def draw_flow(model: nn.Module, batch: dict[str, jax.Array], key: jax.Array,
              config: ml_collections.ConfigDict, null: condition.Null
              ) -> tuple[FlowInputs, jax.Array]:
  """Condition dropout (CFG's ∅ with probability train.label_dropout), logit-normal t and
  Gaussian noise for every example; the fourth key is the loss's (token subsets)."""
  del model
  k_drop, k_time, k_noise, k_tokens = jax.random.split(key, 4)
  images = batch["image"]
  cond = flow.drop_condition(k_drop, condition.from_batch(batch), config.train.label_dropout,
                             null)
  t = flow.sample_time(k_time, images.shape[0])
  noise = jax.random.normal(k_noise, images.shape, images.dtype)
  return FlowInputs(images, noise, t, cond), k_tokens


def flow_matching(model: nn.Module, params: Any, inputs: FlowInputs, rng: jax.Array,
                  config: ml_collections.ConfigDict) -> tuple[jax.Array, Metrics]:
  """Mean squared velocity error at the training sparsity (sgjax.flow.loss)."""
  sparsity = Sparsity.from_config(config.sparsity)

  def velocity(x_t, t, y):
    return model.apply({"params": params}, x_t, t, y, sparsity=sparsity, token_key=rng)
  return flow.loss(velocity, inputs.image, inputs.noise, inputs.t, inputs.condition), {}


def masked(model: nn.Module, params: Any, inputs: FlowInputs, rng: jax.Array,
           config: ml_collections.ConfigDict) -> tuple[jax.Array, Metrics]:
  """MaskDiT: the model reports which pixels its encoder saw; flow matching on those plus
  train.mask_loss_weight times the reconstruction of the rest (sgjax.flow.masked_loss)."""
  sparsity = Sparsity.from_config(config.sparsity)

  def velocity_visible(x_t, t, y):
    v, inter = model.apply({"params": params}, x_t, t, y, sparsity=sparsity, token_key=rng,
                           mutable=["intermediates"])
    return v, inter["intermediates"]["visible"][0]
  return flow.masked_loss(velocity_visible, inputs.image, inputs.noise, inputs.t,
                          inputs.condition, config.train.mask_loss_weight), {}


OBJECTIVES: dict[str, Objective] = {
    "flow": Objective(draw_flow, flow_matching),
    "masked": Objective(draw_flow, masked),
}


def get(config: ml_collections.ConfigDict) -> Objective:
  """The objective `train.objective` names (checked by `check_config`)."""
  return OBJECTIVES[config.train.objective]


def check_config(config: ml_collections.ConfigDict) -> None:
  """`train.objective`: a known name, and one the configured model can be trained with (a
  masked model only with the masked objective, which needs what its encoder saw)."""
  name = config.train.objective
  if name not in OBJECTIVES:  # A registry others add to, so checked here, not declared.
    raise errors.UserError(f"train.objective = {name!r}", "unknown value",
                           f"allowed: one of {', '.join(map(repr, OBJECTIVES))}")
  is_masked = models.from_config(config).masked
  if is_masked and name != "masked":
    raise errors.UserError(f"train.objective = {name!r}",
                           "a masked model (model.decoder_depth > 0) trains on what its encoder "
                           "saw", "set train.objective = 'masked'")
  if name == "masked" and not is_masked:
    raise errors.UserError("train.objective = 'masked'",
                           "needs a masked model (model.decoder_depth > 0)",
                           "set model.decoder_depth > 0, or train.objective = 'flow'")
