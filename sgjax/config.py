"""Model presets and config validation: every field is checked once, here, before any work.

Errors name the field and the allowed range, so a typo on the command line fails in the first
second instead of after compilation. They are `sgjax.errors.UserError`s: one line, exit 2. A key
that `base_config()` does not have (a typo in a config file, where `ConfigDict.update` would add
it silently) is refused too.
"""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections

from sgjax import configs, errors, flow, guidance, models, monitor, sampling, sharding
from sgjax.eval import inception, metrics
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
EVAL_FEATURE_NETS = ("inception", "fmnist")
ENCODE_SOURCES = ("folder", "tfds")
LATENT_DTYPES = ("float16", "float32")


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file: a path, or a shipped config's name ("imagenet256"; see
  sgjax.configs.resolve).

  What `--config=` does, for code and config files that build on another config.
  """
  path = configs.resolve(path)
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def replace(config: ml_collections.ConfigDict, fields: dict[str, object]
            ) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted fields set, e.g. {"sample.guidance.rule": "sg"} (a job's
  variant of the user's config: a demo rule, a sweep point)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for name, value in fields.items():
      *path, last = name.split(".")
      node = c
      for key in path:
        node = node[key]
      node[last] = value
  return c


def apply_preset(model: ml_collections.ConfigDict) -> None:
  """Fills depth/width/heads/patch_size from `model.preset` (empty preset: explicit fields)."""
  if not model.preset:
    return
  if model.preset not in PRESETS:
    raise errors.UserError(f"model.preset = {model.preset!r}", "unknown",
                           f"allowed: {', '.join(PRESETS)} or '' for explicit "
                           "depth/width/heads/patch_size")
  size, patch = model.preset.split("/")
  for k, v in MODEL_SIZES[size].items():
    model[k] = v
  model.patch_size = int(patch)


def _check(cond: bool, field: str, value, allowed: str) -> None:
  if not cond:
    raise errors.UserError(f"{field} = {value!r}", allowed)


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Refuses a key that `base_config()` lacks, naming it, its section's keys and the closest.

  Nothing would read such a key: it is a typo or a field that does not exist (yet).
  """
  def walk(node, reference, path):
    for key in node.keys():
      if key not in reference:
        raise errors.unknown_key(".".join(path + [key]), list(reference.keys()))
      if isinstance(reference[key], ml_collections.ConfigDict) and hasattr(node[key], "keys"):
        walk(node[key], reference[key], path + [key])
  walk(config, base_config(), [])


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises UserError naming the first bad field. Resolves the model preset in place."""
  # Older modules' checks (sparsity, guidance plan, mesh) raise ValueErrors in the same form.
  with errors.user_errors():
    _validate(config, num_devices)


def _validate(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
  check_keys(config)
  m = config.model
  apply_preset(m)
  models.check_config(config)
  tx = config.text
  if config.data.name == "fashion_mnist_captions":
    for name in ("templates", "eval_templates"):
      _check(len(tx[name]) > 0 and all("{}" in t for t in tx[name]), f"text.{name}",
             tx[name], "must be a non-empty tuple of strings, each with one {} for the class")
  d = config.data
  _check(d.channels >= 1, "data.channels", d.channels, "must be >= 1")
  _check(d.num_classes >= 1, "data.num_classes", d.num_classes, "must be >= 1")
  _check(d.worker_count >= 0, "data.worker_count", d.worker_count, "must be >= 0")
  _check(d.prefetch >= 0, "data.prefetch", d.prefetch, "must be >= 0 (batches placed ahead)")
  _check(config.dtype in DTYPES, "dtype", config.dtype, f"allowed: {DTYPES}")
  _validate_vae(config)

  Sparsity.from_config(config.sparsity).validate(m.depth, "sparsity.routes")
  if m.decoder_depth > 0:
    _check(not config.sparsity.routes, "sparsity.routes", config.sparsity.routes,
           "a masked model (model.decoder_depth > 0) thins tokens by masking "
           "(sparsity.mask_gamma); routes and masking together are not supported")
  else:
    _check(config.sparsity.mask_gamma == 0, "sparsity.mask_gamma", config.sparsity.mask_gamma,
           "masking needs a decoder: set model.decoder_depth > 0, or mask_gamma = 0")

  t = config.train
  _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
  _check(t.num_steps >= 1, "train.num_steps", t.num_steps,
         "must be >= 1 (the step to train to; 0 would train nothing)")
  _check(math.isfinite(t.lr) and t.lr > 0, "train.lr", t.lr, "must be finite and > 0")
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
  _check(t.mask_loss_weight >= 0, "train.mask_loss_weight", t.mask_loss_weight, "must be >= 0")
  for name in ("log_every", "checkpoint_every"):
    _check(t[name] >= 1, f"train.{name}", t[name], "must be >= 1")

  for name in ("data", "fsdp", "tensor"):
    size = config.mesh[name]
    _check(size == -1 or size >= 1, f"mesh.{name}", size, "must be >= 1, or -1 for the rest")
  if num_devices is not None:
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
  for name, ok, allowed in (
      ("rules", all(r in guidance.RULES for r in w.rules), f"each in {guidance.RULES}"),
      ("omegas", all(o >= 0 for o in w.omegas), "each >= 0"),
      ("gammas_strong", all(0 <= g < 1 for g in w.gammas_strong), "each in [0, 1)"),
      ("gammas_weak", all(0 <= g < 1 for g in w.gammas_weak), "each in [0, 1)"),
      ("steps", all(int(k) >= 1 for k in w.steps), "each >= 1"),
      ("per_class", w.per_class >= 1, ">= 1")):
    _check(ok, f"sweep.{name}", w[name], f"must be {allowed}")
  _check(config.demo.eval_per_class >= 1, "demo.eval_per_class", config.demo.eval_per_class,
         "must be >= 1")
  _validate_eval(config, num_devices)
  monitor.check_config(config)  # train.sample_every, train.profile_steps.
  s = config.sample
  _check(s.steps >= 1, "sample.steps", s.steps, "must be >= 1")
  _check(s.sampler in sampling.SAMPLERS, "sample.sampler", s.sampler,
         f"allowed: {sampling.SAMPLERS}")
  _check(s.time_shift > 0, "sample.time_shift", s.time_shift, "must be > 0 (1 = uniform grid)")
  _check(s.batch_size >= 1, "sample.batch_size", s.batch_size, "must be >= 1")
  _check(s.per_class >= 1, "sample.per_class", s.per_class,
         "must be >= 1 (images of each class, or of each prompt)")
  _check(s.num_samples >= 0, "sample.num_samples", s.num_samples, "must be >= 0")
  _check(s.shard_batches >= 1, "sample.shard_batches", s.shard_batches, "must be >= 1")
  g = s.guidance
  _check(g.omega >= 0, "sample.guidance.omega", g.omega, "must be >= 0")
  _check(g.gamma_quantum >= 0, "sample.guidance.gamma_quantum", g.gamma_quantum,
         "must be >= 0 (0 = exact token counts)")
  # The schedule check walks every step (γ ranges, γ_strong < γ_weak where required).
  sampling_plan(config)
  if guidance.strong_is_sparse(g):
    _check(len(config.sparsity.routes) > 0 or m.decoder_depth > 0, "sparsity.routes",
           config.sparsity.routes,
           "sparse guidance needs at least one route (the layers whose tokens γ thins) "
           "or a masked model (model.decoder_depth > 0)")
  if guidance.uses_guide(g.rule):
    _check(g.guide_step >= 0, "sample.guidance.guide_step", g.guide_step,
           "rule 'ag_sg' needs the guide checkpoint's step (>= 0), e.g. an early checkpoint "
           "kept with train.keep_period")


def _validate_eval(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
  e = config.eval
  _check(e.num_samples >= 2, "eval.num_samples", e.num_samples, "must be >= 2 (a covariance)")
  _check(e.feature_net in EVAL_FEATURE_NETS, "eval.feature_net", e.feature_net,
         f"allowed: {EVAL_FEATURE_NETS}")
  if e.feature_net == "fmnist":
    _check(config.data.name == "fashion_mnist", "eval.feature_net", e.feature_net,
           f"'fmnist' scores Fashion-MNIST samples; data.name = {config.data.name!r} needs "
           "'inception'")
  _check(e.preprocess in inception.PREPROCESS, "eval.preprocess", e.preprocess,
         f"allowed: {inception.PREPROCESS}")
  _check(len(e.metrics) > 0 and all(k in metrics.METRICS for k in e.metrics), "eval.metrics",
         e.metrics, f"must be a non-empty tuple, each in {metrics.METRICS}")
  _check(e.nearest_k >= 1, "eval.nearest_k", e.nearest_k, "must be >= 1")
  if any(k in e.metrics for k in ("precision", "recall")):
    _check(e.num_samples > e.nearest_k, "eval.num_samples", e.num_samples,
           f"must be > eval.nearest_k = {e.nearest_k} for precision/recall")
  _check(e.is_split_size >= 1, "eval.is_split_size", e.is_split_size, "must be >= 1")
  _check(e.pr_block_size >= 1, "eval.pr_block_size", e.pr_block_size, "must be >= 1")
  _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be >= 1")
  if num_devices is not None and e.feature_net == "inception":  # Only Inception shards it.
    shape = sharding.mesh_shape(config.mesh, num_devices)
    shards = shape["data"] * shape["fsdp"]
    _check(e.batch_size % shards == 0, "eval.batch_size", e.batch_size,
           f"must be divisible by the data-parallel size mesh.data*mesh.fsdp = {shards}")


def _validate_vae(config: ml_collections.ConfigDict) -> None:
  v, e = config.vae, config.encode
  chans = tuple(v.block_out_channels)
  _check(len(chans) >= 1 and all(c >= 1 and c % v.norm_groups == 0 for c in chans),
         "vae.block_out_channels", chans,
         f"must be >= 1 entries, each a positive multiple of vae.norm_groups = {v.norm_groups}")
  _check(v.norm_groups >= 1, "vae.norm_groups", v.norm_groups, "must be >= 1")
  _check(v.layers_per_block >= 1, "vae.layers_per_block", v.layers_per_block, "must be >= 1")
  _check(v.latent_channels >= 1, "vae.latent_channels", v.latent_channels, "must be >= 1")
  _check(v.in_channels >= 1, "vae.in_channels", v.in_channels, "must be >= 1")
  _check(v.scale > 0, "vae.scale", v.scale, "must be > 0")
  _check(v.chunk >= 1, "vae.chunk", v.chunk, "must be >= 1")
  _check(e.source in ENCODE_SOURCES, "encode.source", e.source, f"allowed: {ENCODE_SOURCES}")
  factor = 2 ** (len(chans) - 1)
  _check(e.image_size >= factor and e.image_size % factor == 0, "encode.image_size",
         e.image_size, f"must be a positive multiple of the VAE's downsampling factor {factor}")
  _check(e.batch_size >= 1, "encode.batch_size", e.batch_size, "must be >= 1")
  _check(e.shard_size >= 1, "encode.shard_size", e.shard_size, "must be >= 1")
  _check(e.dtype in LATENT_DTYPES, "encode.dtype", e.dtype, f"allowed: {LATENT_DTYPES}")
  _check(e.max_shards >= 0, "encode.max_shards", e.max_shards, "must be >= 0 (0 = all)")
  if config.data.name == "latents":
    _check(config.data.channels == v.latent_channels, "data.channels", config.data.channels,
           f"latents have vae.latent_channels = {v.latent_channels} channels")
    _check(config.data.image_size * factor == e.image_size, "data.image_size",
           config.data.image_size, f"latents of encode.image_size = {e.image_size} images are "
           f"{e.image_size // factor} (VAE downsampling x{factor})")


def sampling_plan(config: ml_collections.ConfigDict):
  """The per-step guidance plan of `config.sample` (see sgjax.guidance.plan)."""
  num_tokens = (config.data.image_size // config.model.patch_size) ** 2
  times = flow.time_grid(config.sample.steps, config.sample.time_shift)
  return guidance.plan(config.sample.guidance, Sparsity.from_config(config.sparsity),
                       num_tokens, times)


def base_config() -> ml_collections.ConfigDict:
  """Every field sgjax reads, with defaults. Config files start here and override."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "bfloat16"  # Compute dtype; params and optimizer state stay float32.

  c.model = ml_collections.ConfigDict(dict(
      kind="dit",  # dit (class labels) | trdit (text; reads `text`, see docs/t2i.md).
      preset="", depth=12, width=384, heads=6, patch_size=2, mlp_ratio=4.0,
      attention="auto",  # auto | xla | cudnn (auto: cuDNN flash attention on GPU in bf16).
      remat="none",  # none | full | dots: activation recomputation, trades speed for memory.
      # The network's time input is time_scale·t (DiT-style 1000; imported SiT: 1). prediction:
      # velocity | eps_vp (a DDPM ε-network, e.g. an imported DiT; see docs/checkpoints.md).
      time_scale=1000.0, prediction="velocity",
      # MaskDiT decoder after the depth-layer encoder (docs/masking.md); 0 layers = no decoder.
      decoder_depth=0, decoder_width=512, decoder_heads=16))

  c.data = ml_collections.ConfigDict(dict(
      name="fashion_mnist",  # fashion_mnist | synthetic | latents
      dir="",  # Raw-data folder ('' = the dataset's default location); latents: the encoded set.
      cache_dir="",  # Where packed ArrayRecord datasets go ('' = <workdir>/../data cache default).
      image_size=28, channels=1, num_classes=10,
      # grain worker processes (0 = read in the train process) and batches placed on the devices
      # ahead of the step (host-to-device prefetch; 0 = place each batch when the step needs it).
      worker_count=0, prefetch=2))

  # The SD-VAE (diffusers AutoencoderKL; defaults = sd-vae-ft-ema/-mse). `weights` is the
  # diffusers safetensors file ('' = pixel-space model): sampling decodes latents with it, and
  # `python -m sgjax.tools.encode_latents` encodes images with it. `chunk`: images per device
  # per VAE call (bounds activation memory at 256²).
  c.vae = ml_collections.ConfigDict(dict(
      weights="", scale=0.18215, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
      latent_channels=4, in_channels=3, norm_groups=32, chunk=16))
  # `python -m sgjax.tools.encode_latents`: images -> SD-VAE latents in `data.dir`.
  c.encode = ml_collections.ConfigDict(dict(
      source="folder",  # folder (<source_dir>/<class>/*.JPEG) | tfds (imagenet2012)
      source_dir="",  # The image folder, or tfds' manual_dir holding ILSVRC2012_img_*.tar.
      tfds_data_dir="",  # tfds: where it prepares imagenet2012 ('' = tfds' default).
      split="train", image_size=256,  # ADM center crop to this size.
      flip=True,  # Also encode the horizontally flipped image (a second record).
      batch_size=64, shard_size=4096,  # Source images per shard file (the unit of resume).
      dtype="float16",  # Storage dtype of the latent mean and std.
      max_shards=0))  # > 0: stop after writing this many shards in this run.

  # Text conditioning (model.kind = "trdit"): the frozen encoder's features, written into the
  # dataset once by `python -m sgjax.tools.encode_text`; `layers` trainable layers refine them.
  # train.label_dropout is the probability of the empty prompt then (CFG's ∅).
  c.text = ml_collections.ConfigDict(dict(
      encoder="minilm", width=384, max_tokens=16, layers=2,
      templates=(), eval_templates=()))  # Caption templates, "{}" = the class (data.captions).

  # routes: (start, end, gamma) triples, end inclusive. mask_gamma: the share of tokens a
  # masked model's encoder drops in training (needs model.decoder_depth > 0; not with routes).
  c.sparsity = ml_collections.ConfigDict(dict(routes=(), mask_gamma=0.0))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=256, num_steps=1000, lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0,
      warmup_steps=0, grad_clip=0.0, grad_accum=1, ema_decay=0.9999, ema_warmup=False,
      label_dropout=0.1,
      log_every=50, checkpoint_every=1000, keep_checkpoints=3, async_checkpoint=True,
      keep_period=0,  # > 0: also keep every checkpoint whose step is a multiple (AG guides).
      mask_loss_weight=0.1,  # λ of a masked model's reconstruction term (docs/masking.md).
      # Sample grids to TensorBoard and <workdir>/samples/ every sample_every steps (-1 = at
      # each checkpoint, 0 = off) and a jax.profiler trace of the steps profile_steps =
      # (first, last) into <workdir>/tensorboard/ (() = none); sgjax.monitor checks both.
      sample_every=-1, profile_steps=()))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.sample = ml_collections.ConfigDict(dict(
      steps=40, sampler="euler", time_shift=1.0, batch_size=64, per_class=8, use_ema=True,
      seed=0,
      # --mode=sample with num_samples > 0 writes that many class-balanced samples as .npz
      # shards of shard_batches batches each (resumable), then one merged ADM-style .npz.
      num_samples=0, shard_batches=10,
      # Text models (model.kind = trdit): --mode=sample draws per_class images of each prompt.
      prompts=(),
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
  # `python -m sgjax.study` (docs/study.md): the guidance rules compared at matched GMACs over
  # this grid, searched coordinate-wise (γ pairs at omega_ref and steps_ref, then ω and steps at
  # each rule's best pair); per_class samples a point, final_per_class for the matched
  # comparison (with bootstrap 95% intervals); over `checkpoints` (() = all kept) and beside
  # `dense_workdir` (a dense-trained twin); the mechanism probe at `probe_ts`.
  c.study = ml_collections.ConfigDict(dict(
      stages=("screen", "final", "checkpoints", "dense", "probe"),
      per_class=20, final_per_class=200, bootstrap=1000, seed=1,
      steps=(10, 20, 30), steps_ref=20, omega_ref=3.0,
      cfg_omegas=(1.25, 1.5, 2.0, 3.0, 4.0), cfg_intervals=((0.25, 1.0),),
      omegas=(1.5, 2.0, 3.0, 4.0, 6.0),
      gammas_strong=(0.0, 0.1, 0.2, 0.3, 0.5), gammas_weak=(0.6, 0.7, 0.8, 0.9),
      unguided_gammas=(0.0, 0.25, 0.5, 0.75, 0.9),
      rules=("cfg", "sg", "cfg_sg", "ag_sg"), guide_step=-1,  # ag_sg: -1 = the earliest kept.
      budgets=(),  # GMACs/image levels of the final comparison (() = CFG's at each steps).
      checkpoints=(), dense_workdir="",
      probe_ts=(0.25, 0.5, 0.75), probe_images=500, probe_draws=4))
  # `--mode=eval`: num_samples class-balanced samples with config.sample's guidance (resumable
  # shards under <workdir>/eval/), scored against `reference` (docs/eval.md). feature_net
  # "inception": FID, sFID, IS, precision/recall (k = nearest_k) in the FID Inception, weights
  # from `inception_weights` (converted .npz or pytorch-fid's .pth), reference an ADM batch .npz,
  # an .npz of uint8 images (arr_0) or an image folder; "fmnist": FD-FMNIST, class accuracy and
  # precision/recall in the demo classifier's features, reference = the test split.
  c.eval = ml_collections.ConfigDict(dict(
      num_samples=50000, feature_net="inception", inception_weights="", reference="",
      preprocess="adm",  # adm (TF graph's resize and scaling) | pytorch_fid
      batch_size=64,  # Images per feature-net call, over all devices (ADM: 64).
      metrics=("fid", "sfid", "is", "precision", "recall"), nearest_k=3,
      is_split_size=5000,  # ADM: IS averaged over splits of 5000 samples.
      pr_block_size=10000,  # Rows per pairwise-distance block (memory: block x N floats).
      seed=1))
  return c
