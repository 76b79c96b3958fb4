"""Model presets and config validation: every field is checked once, here, before any work.

Errors name the field and the allowed range, so a typo on the command line fails in the first
second instead of after compilation.
"""

from __future__ import annotations

import ml_collections

from sgjax.sparsity import Sparsity

# DiT/SiT sizes (Peebles & Xie, Table 1). A preset "XL/2" is size XL with patch 2.
MODEL_SIZES = {
    "S": dict(depth=12, width=384, heads=6),
    "B": dict(depth=12, width=768, heads=12),
    "L": dict(depth=24, width=1024, heads=16),
    "XL": dict(depth=28, width=1152, heads=16),
}
PATCH_SIZES = (2, 4, 8)
PRESETS = tuple(f"{s}/{p}" for s in MODEL_SIZES for p in PATCH_SIZES)
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")  # Mirrors sgjax.models.dit.
REMAT_POLICIES = ("none", "full", "dots")
SAMPLERS = ("euler", "heun")  # Mirrors sgjax.sampling.SAMPLERS.


def apply_preset(model: ml_collections.ConfigDict) -> None:
  """Fills depth/width/heads/patch_size from `model.preset` (empty preset: explicit fields)."""
  if not model.preset:
    return
  if model.preset not in PRESETS:
    raise ValueError(f"model.preset = {model.preset!r}: unknown; allowed: {', '.join(PRESETS)} "
                     "or '' for explicit depth/width/heads/patch_size")
  size, patch = model.preset.split("/")
  for k, v in MODEL_SIZES[size].items():
    model[k] = v
  model.patch_size = int(patch)


def _check(cond: bool, field: str, value, allowed: str) -> None:
  if not cond:
    raise ValueError(f"{field} = {value!r}: {allowed}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ValueError naming the first bad field. Resolves the model preset in place."""
  m = config.model
  apply_preset(m)
  _check(m.depth >= 1, "model.depth", m.depth, "must be >= 1")
  _check(m.width >= 1 and m.width % m.heads == 0, "model.width", m.width,
         f"must be a positive multiple of model.heads = {m.heads}")
  _check(m.heads >= 1, "model.heads", m.heads, "must be >= 1")
  _check(m.mlp_ratio > 0, "model.mlp_ratio", m.mlp_ratio, "must be > 0")
  _check(m.patch_size >= 1, "model.patch_size", m.patch_size, "must be >= 1")
  _check(m.attention in ATTENTION_IMPLS, "model.attention", m.attention,
         f"allowed: {ATTENTION_IMPLS}")
  _check(m.remat in REMAT_POLICIES, "model.remat", m.remat, f"allowed: {REMAT_POLICIES}")
  d = config.data
  _check(d.image_size % m.patch_size == 0, "model.patch_size", m.patch_size,
         f"must divide data.image_size = {d.image_size}")
  _check(d.channels >= 1, "data.channels", d.channels, "must be >= 1")
  _check(d.num_classes >= 1, "data.num_classes", d.num_classes, "must be >= 1")
  _check(config.dtype in DTYPES, "dtype", config.dtype, f"allowed: {DTYPES}")

  Sparsity.from_routes(config.sparsity.routes).validate(m.depth, "sparsity.routes")

  t = config.train
  _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
  _check(t.num_steps >= 0, "train.num_steps", t.num_steps, "must be >= 0")
  _check(t.lr > 0, "train.lr", t.lr, "must be > 0")
  _check(0 <= t.b1 < 1, "train.b1", t.b1, "must be in [0, 1)")
  _check(0 <= t.b2 < 1, "train.b2", t.b2, "must be in [0, 1)")
  _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
  _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
  _check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 disables clipping)")
  _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be >= 1")
  _check(t.batch_size % t.grad_accum == 0, "train.grad_accum", t.grad_accum,
         f"must divide train.batch_size = {t.batch_size}")
  _check(0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay, "must be in [0, 1)")
  _check(0 <= t.label_dropout < 1, "train.label_dropout", t.label_dropout, "must be in [0, 1)")
  _check(t.keep_period >= 0, "train.keep_period", t.keep_period, "must be >= 0 (0 = off)")
  for name in ("log_every", "checkpoint_every"):
    _check(t[name] >= 1, f"train.{name}", t[name], "must be >= 1")

  for name in ("data", "fsdp", "tensor"):
    size = config.mesh[name]
    _check(size == -1 or size >= 1, f"mesh.{name}", size, "must be >= 1, or -1 for the rest")
  if num_devices is not None:
    from sgjax import sharding  # Local: sharding imports jax device state.
    shape = sharding.mesh_shape(config.mesh, num_devices)
    batch_shards = shape["data"] * shape["fsdp"]
    micro = t.batch_size // t.grad_accum
    _check(micro % batch_shards == 0, "train.batch_size", t.batch_size,
           f"per-step micro-batch {micro} (batch_size / grad_accum) must be divisible by the "
           f"data-parallel size mesh.data*mesh.fsdp = {batch_shards}")
    _check(config.sample.batch_size % batch_shards == 0, "sample.batch_size",
           config.sample.batch_size,
           f"must be divisible by the data-parallel size mesh.data*mesh.fsdp = {batch_shards}")

  w = config.sweep
  from sgjax.guidance import RULES  # Local: guidance imports jax.
  for name, ok, allowed in (
      ("rules", all(r in RULES for r in w.rules), f"each in {RULES}"),
      ("omegas", all(o >= 0 for o in w.omegas), "each >= 0"),
      ("gammas_strong", all(0 <= g < 1 for g in w.gammas_strong), "each in [0, 1)"),
      ("gammas_weak", all(0 <= g < 1 for g in w.gammas_weak), "each in [0, 1)"),
      ("steps", all(int(k) >= 1 for k in w.steps), "each >= 1"),
      ("per_class", w.per_class >= 1, ">= 1")):
    _check(ok, f"sweep.{name}", w[name], f"must be {allowed}")
  _check(config.demo.eval_per_class >= 1, "demo.eval_per_class", config.demo.eval_per_class,
         "must be >= 1")
  s = config.sample
  _check(s.steps >= 1, "sample.steps", s.steps, "must be >= 1")
  _check(s.sampler in SAMPLERS, "sample.sampler", s.sampler, f"allowed: {SAMPLERS}")
  _check(s.time_shift > 0, "sample.time_shift", s.time_shift, "must be > 0 (1 = uniform grid)")
  _check(s.batch_size >= 1, "sample.batch_size", s.batch_size, "must be >= 1")
  _check(s.num_samples >= 0, "sample.num_samples", s.num_samples, "must be >= 0")
  _check(s.shard_batches >= 1, "sample.shard_batches", s.shard_batches, "must be >= 1")
  g = s.guidance
  _check(g.omega >= 0, "sample.guidance.omega", g.omega, "must be >= 0")
  _check(g.gamma_quantum >= 0, "sample.guidance.gamma_quantum", g.gamma_quantum,
         "must be >= 0 (0 = exact token counts)")
  # The schedule check walks every step (γ ranges, γ_strong < γ_weak where required).
  sampling_plan(config)
  strong_ever_sparse = g.gamma_strong > 0 or (g.schedule == "cosine" and g.gamma_strong_end > 0)
  # CFG's branches are dense whatever γ says; every other rule runs γ_strong.
  if g.rule in ("sg", "cfg_sg", "ag_sg") or (g.rule == "none" and strong_ever_sparse):
    _check(len(config.sparsity.routes) > 0, "sparsity.routes", config.sparsity.routes,
           "sparse guidance needs at least one route (the layers whose tokens γ thins)")
  if g.rule == "ag_sg":
    _check(g.guide_step >= 0, "sample.guidance.guide_step", g.guide_step,
           "rule 'ag_sg' needs the guide checkpoint's step (>= 0), e.g. an early checkpoint "
           "kept with train.keep_period")


def sampling_plan(config: ml_collections.ConfigDict):
  """The per-step guidance plan of `config.sample` (see sgjax.guidance.plan)."""
  # Local: these import jax, and config files import this module.
  from sgjax import flow, guidance
  num_tokens = (config.data.image_size // config.model.patch_size) ** 2
  times = flow.time_grid(config.sample.steps, config.sample.time_shift)
  return guidance.plan(config.sample.guidance, Sparsity.from_routes(config.sparsity.routes),
                       num_tokens, times)


def base_config() -> ml_collections.ConfigDict:
  """Every field sgjax reads, with defaults. Config files start here and override."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "bfloat16"  # Compute dtype; params and optimizer state stay float32.

  c.model = ml_collections.ConfigDict(dict(
      preset="", depth=12, width=384, heads=6, patch_size=2, mlp_ratio=4.0,
      attention="auto",  # auto | xla | cudnn (auto: cuDNN flash attention on GPU in bf16).
      remat="none"))  # none | full | dots: activation recomputation, trades speed for memory.

  c.data = ml_collections.ConfigDict(dict(
      name="fashion_mnist",  # fashion_mnist | synthetic
      dir="",  # Raw-data folder ('' = the dataset's default location).
      cache_dir="",  # Where packed ArrayRecord datasets go ('' = <workdir>/../data cache default).
      image_size=28, channels=1, num_classes=10,
      shuffle_buffer_seed=0, worker_count=0, prefetch=2))

  # (start, end, gamma) triples; end inclusive.
  c.sparsity = ml_collections.ConfigDict(dict(routes=()))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=256, num_steps=1000, lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0,
      warmup_steps=0, grad_clip=0.0, grad_accum=1, ema_decay=0.9999, ema_warmup=False,
      label_dropout=0.1,
      log_every=50, checkpoint_every=1000, keep_checkpoints=3, async_checkpoint=True,
      keep_period=0))  # > 0: also keep every checkpoint whose step is a multiple (AG guides).

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.sample = ml_collections.ConfigDict(dict(
      steps=40, sampler="euler", time_shift=1.0, batch_size=64, per_class=8, use_ema=True,
      seed=0,
      # --mode=sample with num_samples > 0 writes that many class-balanced samples as .npz
      # shards of shard_batches batches each (resumable), then one merged ADM-style .npz.
      num_samples=0, shard_batches=10,
      guidance=ml_collections.ConfigDict(dict(
          rule="cfg",  # none | cfg | sg | cfg_sg | ag_sg
          omega=1.5,
          gamma_strong=0.0, gamma_weak=0.5,
          # "cosine" moves γ from gamma_* (first step) to gamma_*_end (last step).
          schedule="constant", gamma_strong_end=0.0, gamma_weak_end=0.0,
          gamma_quantum=0.0,  # > 0 rounds γ to this grid: fewer compiled step bodies.
          interval=(0.0, 1.0),  # Guide only at steps whose t is inside (0 = noise, 1 = data).
          # ag_sg: the weak branch's weights, an earlier checkpoint ('' = this workdir).
          guide_workdir="", guide_step=-1))))
  # `--mode=demo` samples CFG and SG side by side at these weights, eval_per_class images per
  # class each, and scores them with the FD-FMNIST classifier (Fashion-MNIST only).
  c.demo = ml_collections.ConfigDict(dict(omega_cfg=1.5, omega_sg=1.5, eval_per_class=30))
  # `python -m sgjax.sweep`: the grid rule × ω × γ_strong × γ_weak × steps, per_class samples
  # per class for every point.
  c.sweep = ml_collections.ConfigDict(dict(
      rules=("cfg", "sg"), omegas=(1.5, 2.0, 3.0), gammas_strong=(0.0,),
      gammas_weak=(0.3, 0.5, 0.7), steps=(40,), per_class=16, seed=1))
  return c
