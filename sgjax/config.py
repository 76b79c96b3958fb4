"""The config's declarations: `base_config()` (every field sgjax reads, with its default), config
files (`load_config_file`, the shipped ones found by name with `resolve`) and `replace`. A leaf:
it imports nothing of sgjax, so anything (errors, workdir records, the checkers) may read it.

What a value may be is checked by the module that reads it, and `sgjax.validation.validate(config,
num_devices, job)` runs the checks of the sections a job reads (docs/design.md).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

# The shipped config files (sgjax/configs/), one `get_config()` each.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def shipped_names() -> list[str]:
  """The shipped configs' names."""
  return sorted(n[:-3] for n in os.listdir(SHIPPED_DIR)
                if n.endswith(".py") and n != "__init__.py")


def resolve(path: str) -> str:
  """`path` when it exists; else the shipped config its file name names; else `path` (whose
  loading then fails, naming it). So `--config=fashion_mnist`, `fashion_mnist.py` and
  `configs/fashion_mnist.py` name sgjax/configs/fashion_mnist.py from any directory, unless that
  path exists where the command runs (a user's own config file always wins)."""
  if os.path.exists(path):
    return path
  name = os.path.basename(path).removesuffix(".py")
  return os.path.join(SHIPPED_DIR, name + ".py") if name in shipped_names() else path


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file: a path, or a shipped config's name ("imagenet256"; see
  `resolve`).

  What `--config=` does, for code and config files that build on another config.
  """
  path = resolve(path)
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
      # What the step minimises (sgjax.objectives): flow (flow matching) | masked (MaskDiT's
      # objective, for a masked model); mask_loss_weight: its reconstruction term's λ.
      objective="flow", mask_loss_weight=0.1,
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
  # `python -m sgjax.jobs.sweep`: the grid rule × ω × γ_strong × γ_weak × steps, per_class samples
  # per class for every point.
  c.sweep = ml_collections.ConfigDict(dict(
      rules=("cfg", "sg"), omegas=(1.5, 2.0, 3.0), gammas_strong=(0.0,),
      gammas_weak=(0.3, 0.5, 0.7), steps=(40,), per_class=16, seed=1))
  # `python -m sgjax.jobs.study` (docs/study.md): the guidance rules compared at matched GMACs over
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
      probe_ts=(0.25, 0.5, 0.75), probe_images=500, probe_draws=4,
      # search "coordinate": the grid above searched a coordinate at a time at steps_ref;
      # "budget": every point at the most Euler steps within a budget (GMACs/image), ω × γ
      # jointly at budget_ref (0 = the middle budget), each rule's top_settings refit at the
      # others (docs/study.md). final_seeds: sampling seeds of the final rows (() = seed).
      # final_families: the families compared at every budget (refits and final; the others
      # and the twin at budget_ref only; () = all everywhere). probe_gammas: the
      # probe's (γs, γw) (() = SG's best); probe_routes: the routes the probe drops tokens on
      # where the model has none (a dense twin; () = the model's).
      # omega_extensions: how often the budget search pushes a best ω past its grid's edge.
      search="coordinate", budget_ref=0.0, top_settings=2, final_seeds=(), final_families=(),
      omega_extensions=3,
      probe_gammas=(), probe_routes=()))
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
