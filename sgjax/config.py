"""The config's declarations: `base_config()` (every field sgjax reads, with its default and
what it may hold), config files (`load_config_file`, the shipped ones found by name with
`resolve`) and `replace`. A leaf: it imports nothing of sgjax, so anything (errors, workdir
records, the checkers) may read it.

Every field is declared once, `F(default, spec)`: its type, a tuple's arity and element types,
its range (numbers are finite) and its allowed values (`Spec`). `declarations()` maps each
dotted field to its spec and `problem(spec, value)` says what is wrong with a value, so
`sgjax.validation` checks every field a job reads generically, before the modules' checks of
what depends on other fields (γ order, batch vs devices, patch vs image size; docs/design.md).
A field cannot be added without saying what it accepts: `_declared` takes only `F`s.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any, NamedTuple

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


@dataclasses.dataclass(frozen=True)
class Spec:
  """What one field may hold: `kind` (bool, int, float, str or tuple) and, for numbers, `bounds`
  ("[0, 1)", ">= 1", "> 0", "" = any; floats are always finite) with `also` (values allowed
  outside them, e.g. -1 = "the rest"); for strings, `choices` (() = any string); for tuples,
  `items` (a fixed arity: one spec per position, named by `names`; `optional`: () too) or
  `each` (any length >= `min_len`, every element one spec). `note`: what a value means."""

  kind: type
  bounds: str = ""
  also: tuple = ()
  choices: tuple = ()
  items: tuple[Spec, ...] = ()
  names: tuple[str, ...] = ()
  optional: bool = False
  each: Spec | None = None
  min_len: int = 0
  note: str = ""


def integer(bounds: str = "", *, also: tuple = (), note: str = "") -> Spec:
  return Spec(int, bounds=bounds, also=also, note=note)


def real(bounds: str = "", *, note: str = "") -> Spec:
  return Spec(float, bounds=bounds, note=note)


def text(*choices: str, note: str = "") -> Spec:
  return Spec(str, choices=choices, note=note)


BOOL = Spec(bool)
GAMMA = real("[0, 1)")  # A share of tokens dropped: 1 would drop them all.


def fixed(*items: Spec, names: tuple[str, ...] = (), optional: bool = False,
          note: str = "") -> Spec:
  """A tuple of exactly len(items) values (or () when `optional`)."""
  return Spec(tuple, items=items, names=names, optional=optional, note=note)


def tuple_of(each: Spec, min_len: int = 0, note: str = "") -> Spec:
  return Spec(tuple, each=each, min_len=min_len, note=note)


# sample.guidance.rule (its branches: sgjax.guidance.RULE_BRANCHES, which must list these).
GUIDANCE_RULES = ("none", "cfg", "sg", "cfg_sg", "ag_sg")
ROUTES = tuple_of(fixed(integer(">= 0"), integer(">= 0"), GAMMA,
                        names=("start", "end", "gamma")))


class F(NamedTuple):
  """A declared field: its default beside what it may hold."""
  default: Any
  spec: Spec


def _in_bounds(bounds: str, x: float) -> bool:
  if not bounds:
    return True
  if bounds[0] in "[(":
    lo, hi = (float(v) for v in bounds[1:-1].split(","))
    return ((lo <= x if bounds[0] == "[" else lo < x)
            and (x <= hi if bounds[-1] == "]" else x < hi))
  op, limit = bounds.split()
  return {">=": x >= float(limit), ">": x > float(limit), "<=": x <= float(limit),
          "<": x < float(limit)}[op]


def _kind_name(value: Any) -> str:
  return {bool: "a bool", int: "an int", float: "a float", str: "a string", tuple: "a tuple",
          list: "a list", type(None): "None"}.get(type(value), f"a {type(value).__name__}")


def describe(spec: Spec) -> str:
  """What `spec` allows, in words ("an int >= 1, or -1 (the rest)")."""
  if spec.kind is bool:
    out = "True or False"
  elif spec.kind in (int, float):
    out = "an int" if spec.kind is int else "a finite number"
    if spec.bounds:
      out += f" {'in ' if spec.bounds[0] in '[(' else ''}{spec.bounds}"
    out += "".join(f", or {v!r}" for v in spec.also)
  elif spec.kind is str:
    out = ("one of " + ", ".join(map(repr, spec.choices))) if spec.choices else "a string"
  elif spec.items:
    names = spec.names or tuple(f"#{i}" for i in range(len(spec.items)))
    out = "(" + ", ".join(names) + ") with " + "; ".join(
        f"{n} {describe(s)}" for n, s in zip(names, spec.items, strict=True))
    out = f"() or {out}" if spec.optional else out
  else:
    out = (f"a tuple of at least {spec.min_len} item{'s' * (spec.min_len != 1)}"
           if spec.min_len else "a tuple of any length")
    out += f", each item {describe(spec.each)}"
  return f"{out} ({spec.note})" if spec.note else out


def problem(spec: Spec, value: Any, where: str = "") -> tuple[str, Any, str, Spec] | None:
  """What is wrong with `value` for `spec`, or None: (where, the bad part of value, what is
  wrong, the spec it breaks); `where` grows with the position in a tuple ("[0].gamma")."""
  def bad(what: str) -> tuple[str, Any, str, Spec]:
    return where, value, what, spec

  if spec.kind is bool:
    return None if isinstance(value, bool) else bad(f"not True or False ({_kind_name(value)})")
  if spec.kind in (int, float):
    number = (int,) if spec.kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, number):
      return bad(f"not {'an int' if spec.kind is int else 'a number'} ({_kind_name(value)})")
    if value in spec.also:
      return None
    if not math.isfinite(value):
      return bad("not finite")
    return None if _in_bounds(spec.bounds, value) else bad("out of range")
  if spec.kind is str:
    if not isinstance(value, str):
      return bad(f"not a string ({_kind_name(value)})")
    return None if not spec.choices or value in spec.choices else bad("unknown value")
  if not isinstance(value, tuple | list):
    return bad(f"not a tuple ({_kind_name(value)})")
  if spec.items:
    if spec.optional and len(value) == 0:
      return None
    if len(value) != len(spec.items):
      return bad(f"{len(value)} value{'s' * (len(value) != 1)}, not {len(spec.items)}")
    names = spec.names or tuple(f"[{i}]" for i in range(len(spec.items)))
    for name, item, v in zip(names, spec.items, value, strict=True):
      found = problem(item, v, f"{where}{'.' * (not name.startswith('['))}{name}")
      if found:
        return found
    return None
  if len(value) < spec.min_len:
    return bad(f"{len(value)} value{'s' * (len(value) != 1)}, fewer than {spec.min_len}")
  for i, v in enumerate(value):
    found = problem(spec.each, v, f"{where}[{i}]")
    if found:
      return found
  return None


def _split(tree: dict[str, Any], prefix: str, specs: dict[str, Spec]
           ) -> ml_collections.ConfigDict:
  """The ConfigDict of the defaults of a tree of `F`s; their specs go into `specs` by path."""
  out = {}
  for key, node in tree.items():
    if isinstance(node, dict):
      out[key] = _split(node, f"{prefix}{key}.", specs)
    elif isinstance(node, F):
      out[key], specs[prefix + key] = node.default, node.spec
    else:  # A bug in the declarations, not the user's.
      raise TypeError(f"{prefix}{key} = {node!r}: declare it as F(default, spec)")
  return ml_collections.ConfigDict(out)


def declarations() -> dict[str, Spec]:
  """{dotted field: Spec} for every leaf of `base_config()`."""
  specs: dict[str, Spec] = {}
  _split(_declared(), "", specs)
  return specs


def base_config() -> ml_collections.ConfigDict:
  """Every field sgjax reads, with defaults. Config files start here and override."""
  return _split(_declared(), "", {})


def _declared() -> dict[str, Any]:
  """Every field: its default and what it may hold (`F`), one section a dict."""
  c: dict[str, Any] = {}
  c["seed"] = F(0, integer(">= 0"))
  # Compute dtype; params and optimizer state stay float32.
  c["dtype"] = F("bfloat16", text("float32", "bfloat16"))

  c["model"] = dict(
      # dit (class labels) | trdit (text; reads `text`, see docs/t2i.md).
      kind=F("dit", text("dit", "trdit")),
      preset=F("", text("", *(f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)),
                           note="'' = depth/width/heads/patch_size as set")),
      depth=F(12, integer(">= 1")), width=F(384, integer(">= 1")),
      heads=F(6, integer(">= 1")), patch_size=F(2, integer(">= 1")),
      mlp_ratio=F(4.0, real("> 0")),
      # auto: cuDNN flash attention on GPU in bf16.
      attention=F("auto", text("auto", "xla", "cudnn")),
      # Activation recomputation: trades speed for memory.
      remat=F("none", text("none", "full", "dots")),
      # The network's time input is time_scale·t (DiT-style 1000; imported SiT: 1). prediction:
      # eps_vp is a DDPM ε-network, e.g. an imported DiT (docs/checkpoints.md).
      time_scale=F(1000.0, real("> 0")), prediction=F("velocity", text("velocity", "eps_vp")),
      # MaskDiT decoder after the depth-layer encoder (docs/masking.md); 0 layers = no decoder.
      decoder_depth=F(0, integer(">= 0", note="0 = no decoder")),
      decoder_width=F(512, integer(">= 4")), decoder_heads=F(16, integer(">= 1")))

  c["data"] = dict(
      name=F("fashion_mnist",
             text("fashion_mnist", "synthetic", "latents", "fashion_mnist_captions")),
      # Raw-data folder ('' = the dataset's default location); latents: the encoded set.
      dir=F("", text()),
      # Where packed ArrayRecord datasets go ('' = <workdir>/../data cache default).
      cache_dir=F("", text()),
      image_size=F(28, integer(">= 1")), channels=F(1, integer(">= 1")),
      num_classes=F(10, integer(">= 1")),
      # grain worker processes (0 = read in the train process) and batches placed on the devices
      # ahead of the step (host-to-device prefetch; 0 = place each batch when the step needs it).
      worker_count=F(0, integer(">= 0")), prefetch=F(2, integer(">= 0")))

  # The SD-VAE (diffusers AutoencoderKL; defaults = sd-vae-ft-ema/-mse). `weights` is the
  # diffusers safetensors file ('' = pixel-space model): sampling decodes latents with it, and
  # `python -m sgjax.tools.encode_latents` encodes images with it. `chunk`: images per device
  # per VAE call (bounds activation memory at 256²).
  c["vae"] = dict(
      weights=F("", text()), scale=F(0.18215, real("> 0")),
      block_out_channels=F((128, 256, 512, 512), tuple_of(integer(">= 1"), min_len=1)),
      layers_per_block=F(2, integer(">= 1")), latent_channels=F(4, integer(">= 1")),
      in_channels=F(3, integer(">= 1")), norm_groups=F(32, integer(">= 1")),
      chunk=F(16, integer(">= 1")))
  # `python -m sgjax.tools.encode_latents`: images -> SD-VAE latents in `data.dir`.
  c["encode"] = dict(
      # folder: <source_dir>/<class>/*.JPEG; tfds: imagenet2012.
      source=F("folder", text("folder", "tfds")),
      # The image folder, or tfds' manual_dir holding ILSVRC2012_img_*.tar.
      source_dir=F("", text()),
      tfds_data_dir=F("", text()),  # tfds: where it prepares imagenet2012 ('' = tfds' default).
      split=F("train", text()),
      image_size=F(256, integer(">= 1")),  # ADM center crop to this size.
      flip=F(True, BOOL),  # Also encode the horizontally flipped image (a second record).
      batch_size=F(64, integer(">= 1")),
      shard_size=F(4096, integer(">= 1")),  # Source images per shard file (the unit of resume).
      dtype=F("float16", text("float16", "float32")),  # Storage dtype of the latent mean and std.
      # > 0: stop after writing this many shards in this run.
      max_shards=F(0, integer(">= 0", note="0 = all")))

  # Text conditioning (model.kind = "trdit"): the frozen encoder's features, written into the
  # dataset once by `python -m sgjax.tools.encode_text`; `layers` trainable layers refine them.
  # train.label_dropout is the probability of the empty prompt then (CFG's ∅).
  c["text"] = dict(
      # A name in sgjax.text.encoder.ENCODERS (a registry others add to: not listed here).
      encoder=F("minilm", text()), width=F(384, integer(">= 1")),
      max_tokens=F(16, integer(">= 2")), layers=F(2, integer(">= 0")),
      # Caption templates, "{}" = the class (data.captions).
      templates=F((), tuple_of(text())), eval_templates=F((), tuple_of(text())))

  # routes: (start, end, gamma) triples, end inclusive. mask_gamma: the share of tokens a
  # masked model's encoder drops in training (needs model.decoder_depth > 0; not with routes).
  c["sparsity"] = dict(routes=F((), ROUTES), mask_gamma=F(0.0, GAMMA))

  c["train"] = dict(
      batch_size=F(256, integer(">= 1")),
      num_steps=F(1000, integer(">= 1", note="the step to train to")),
      lr=F(1e-4, real("> 0")), b1=F(0.9, real("[0, 1)")), b2=F(0.999, real("[0, 1)")),
      weight_decay=F(0.0, real(">= 0")), warmup_steps=F(0, integer(">= 0")),
      grad_clip=F(0.0, real(">= 0", note="0 = no clipping")), grad_accum=F(1, integer(">= 1")),
      ema_decay=F(0.9999, real("[0, 1)")), ema_warmup=F(False, BOOL),
      label_dropout=F(0.1, real("[0, 1)")),
      log_every=F(50, integer(">= 1")), checkpoint_every=F(1000, integer(">= 1")),
      keep_checkpoints=F(3, integer(">= 1")), async_checkpoint=F(True, BOOL),
      # > 0: also keep every checkpoint whose step is a multiple (AG guides).
      keep_period=F(0, integer(">= 0", note="0 = off")),
      # What the step minimises (sgjax.objectives): flow (flow matching) | masked (MaskDiT's
      # objective, for a masked model); mask_loss_weight: its reconstruction term's λ.
      # A name in sgjax.objectives.OBJECTIVES (a registry others add to: checked there).
      objective=F("flow", text()), mask_loss_weight=F(0.1, real(">= 0")),
      # Sample grids to TensorBoard and <workdir>/samples/ every sample_every steps and a
      # jax.profiler trace of the steps profile_steps = (first, last) into
      # <workdir>/tensorboard/; sgjax.monitor checks first <= last.
      sample_every=F(-1, integer(">= -1", note="-1 = at each checkpoint, 0 = off")),
      profile_steps=F((), fixed(integer(">= 1"), integer(">= 1"), names=("first", "last"),
                                optional=True, note="() = no profile")),
      # A new run's first step starts from these weights (sgjax.init_from, docs/init_from.md):
      # a workdir (its checkpoint init_step, its EMA or raw params), an sgjax-export file or
      # an official DiT/SiT .pt/.safetensors; '' = a fresh init.
      init_from=F("", text(note="'' = fresh init")),
      init_step=F(-1, integer(">= 0", also=(-1,), note="a workdir's step; -1 = its latest")),
      init_params=F("ema", text("ema", "params", note="a workdir's EMA or raw params")))

  c["mesh"] = {axis: F(-1 if axis == "data" else 1, integer(">= 1", also=(-1,),
                                                              note="-1 = the rest"))
               for axis in ("data", "fsdp", "tensor")}

  c["sample"] = dict(
      steps=F(40, integer(">= 1")), sampler=F("euler", text("euler", "heun")),
      time_shift=F(1.0, real("> 0", note="1 = uniform grid")),
      batch_size=F(64, integer(">= 1")),
      per_class=F(8, integer(">= 1", note="images of each class, or of each prompt")),
      use_ema=F(True, BOOL), seed=F(0, integer(">= 0")),
      # --mode=sample with num_samples > 0 writes that many class-balanced samples as .npz
      # shards of shard_batches batches each (resumable), then one merged ADM-style .npz.
      num_samples=F(0, integer(">= 0")), shard_batches=F(10, integer(">= 1")),
      # Text models (model.kind = trdit): --mode=sample draws per_class images of each prompt.
      prompts=F((), tuple_of(text())),
      guidance=dict(
          rule=F("cfg", text(*GUIDANCE_RULES)),
          omega=F(1.5, real(">= 0")),
          gamma_strong=F(0.0, GAMMA), gamma_weak=F(0.5, GAMMA),
          # "cosine" moves γ from gamma_* (first step) to gamma_*_end (last step).
          schedule=F("constant", text("constant", "cosine")),
          gamma_strong_end=F(0.0, GAMMA), gamma_weak_end=F(0.0, GAMMA),
          # > 0 rounds γ to this grid: fewer compiled step bodies.
          gamma_quantum=F(0.0, real(">= 0", note="0 = exact token counts")),
          # Guide only at steps whose t is inside (0 = noise, 1 = data); guidance checks lo < hi.
          interval=F((0.0, 1.0), fixed(real("[0, 1]"), real("[0, 1]"), names=("t_lo", "t_hi"))),
          # The weak branch's token subsets: "step" draws new ones at every step (the paper's),
          # "trajectory" draws them once per sample for the whole path (no draw noise across
          # steps for ω − 1 to amplify).
          token_draw=F("step", text("step", "trajectory")),
          # ag_sg: the weak branch's weights, an earlier checkpoint ('' = this workdir).
          guide_workdir=F("", text()),
          guide_step=F(-1, integer(">= 0", also=(-1,), note="-1 = none"))))
  # `--mode=demo` samples CFG and SG side by side at these weights, eval_per_class images per
  # class each, and scores them with the FD-FMNIST classifier (Fashion-MNIST only).
  c["demo"] = dict(omega_cfg=F(1.5, real(">= 0")), omega_sg=F(1.5, real(">= 0")),
                   eval_per_class=F(30, integer(">= 1")))
  # `python -m sgjax.jobs.sweep`: the grid rule × ω × γ_strong × γ_weak × steps, per_class samples
  # per class for every point.
  # An empty axis is refused by the sweep (no grid point).
  c["sweep"] = dict(
      rules=F(("cfg", "sg"), tuple_of(text(*GUIDANCE_RULES))),
      omegas=F((1.5, 2.0, 3.0), tuple_of(real(">= 0"))),
      gammas_strong=F((0.0,), tuple_of(GAMMA)), gammas_weak=F((0.3, 0.5, 0.7), tuple_of(GAMMA)),
      steps=F((40,), tuple_of(integer(">= 1"))), per_class=F(16, integer(">= 1")),
      seed=F(1, integer(">= 0")))
  # `python -m sgjax.jobs.study` (docs/study.md): the guidance rules compared at matched GMACs over
  # this grid, searched coordinate-wise (γ pairs at omega_ref and steps_ref, then ω and steps at
  # each rule's best pair); per_class samples a point, final_per_class for the matched
  # comparison (with bootstrap 95% intervals); over `checkpoints` (() = all kept) and beside
  # `dense_workdir` (a dense-trained twin); the mechanism probe at `probe_ts`.
  stages = ("screen", "final", "checkpoints", "dense", "probe", "trend")
  c["study"] = dict(
      stages=F(stages[:-1], tuple_of(text(*stages), min_len=1)),  # "trend": on request.
      per_class=F(20, integer(">= 1")), final_per_class=F(200, integer(">= 1")),
      bootstrap=F(1000, integer(">= 0", note="0 = no intervals")), seed=F(1, integer(">= 0")),
      steps=F((10, 20, 30), tuple_of(integer(">= 1"), min_len=1)),
      steps_ref=F(20, integer(">= 1")), omega_ref=F(3.0, real(">= 0")),
      cfg_omegas=F((1.25, 1.5, 2.0, 3.0, 4.0), tuple_of(real(">= 0"), min_len=1)),
      cfg_intervals=F(((0.25, 1.0),), tuple_of(fixed(real("[0, 1]"), real("[0, 1]"),
                                                     names=("t_lo", "t_hi")))),
      omegas=F((1.5, 2.0, 3.0, 4.0, 6.0), tuple_of(real(">= 0"), min_len=1)),
      gammas_strong=F((0.0, 0.1, 0.2, 0.3, 0.5), tuple_of(GAMMA, min_len=1)),
      gammas_weak=F((0.6, 0.7, 0.8, 0.9), tuple_of(real("(0, 1)"), min_len=1)),
      unguided_gammas=F((0.0, 0.25, 0.5, 0.75, 0.9), tuple_of(GAMMA)),
      rules=F(("cfg", "sg", "cfg_sg", "ag_sg"), tuple_of(text(*GUIDANCE_RULES[1:]), min_len=1)),
      guide_step=F(-1, integer(">= 0", also=(-1,), note="ag_sg: -1 = the earliest kept")),
      # GMACs/image levels of the final comparison (() = CFG's at each steps).
      budgets=F((), tuple_of(real("> 0"))),
      checkpoints=F((), tuple_of(integer(">= 0"), note="() = all kept")),
      dense_workdir=F("", text()),
      probe_ts=F((0.25, 0.5, 0.75), tuple_of(real("(0, 1)"))),
      probe_images=F(500, integer(">= 1")), probe_draws=F(4, integer(">= 1")),
      # search "coordinate": the grid above searched a coordinate at a time at steps_ref;
      # "budget": every point at the most Euler steps within a budget (GMACs/image), ω × γ
      # jointly at budget_ref (0 = the middle budget), each rule's top_settings refit at the
      # others (docs/study.md). final_seeds: sampling seeds of the final rows (() = seed).
      # final_families: the families compared at every budget (refits and final; the others
      # and the twin at budget_ref only; () = all everywhere). probe_gammas: the
      # probe's (γs, γw) (() = SG's best); probe_routes: the routes the probe drops tokens on
      # where the model has none (a dense twin; () = the model's).
      # omega_extensions: how often the budget search pushes a best ω past its grid's edge
      # (× or ÷ 1.5; below 1.5 halfway to 1, down to 1.1).
      search=F("coordinate", text("coordinate", "budget")),
      budget_ref=F(0.0, real(">= 0", note="0 = the middle budget")),
      top_settings=F(2, integer(">= 1")), final_seeds=F((), tuple_of(integer(">= 0"))),
      final_families=F((), tuple_of(text(), note="() = all; families as the report names them")),
      omega_extensions=F(3, integer(">= 0")),
      # gamma_extensions: how often it pushes a best γ_weak past its grid's edge (0.1 down,
      # halfway to 1 up). token_draws: SG searched with each weak-branch token draw
      # (sample.guidance.token_draw; "trajectory" adds the family "sg traj"). guides: AG's guide
      # choices, each a family of its own: a step (>= 1, tag "g@500") or a share of the studied
      # step (< 1, the nearest kept checkpoint; 0.0625 = "g/16"); () = guide_step, untagged.
      # ag_cosine: (γs start, γs end, γw start, γw end) of an AG+SG family with the cosine γ
      # schedule (the paper's: (0, 0.6, 0.6, 0)); () = none. The "trend" stage runs screen,
      # final and paired at each of `checkpoints` (each in study/trend/step_<N>/), the probe at
      # all of them, and draws the trends over training (study/trend/).
      gamma_extensions=F(0, integer(">= 0")),
      token_draws=F(("step",), tuple_of(text("step", "trajectory"), min_len=1)),
      guides=F((), tuple_of(real("> 0"))),
      ag_cosine=F((), fixed(GAMMA, GAMMA, GAMMA, GAMMA, names=(
          "gamma_strong", "gamma_strong_end", "gamma_weak", "gamma_weak_end"), optional=True)),
      probe_gammas=F((), fixed(GAMMA, GAMMA, names=("gamma_strong", "gamma_weak"),
                               optional=True)),
      probe_routes=F((), ROUTES))
  # `--mode=eval`: num_samples class-balanced samples with config.sample's guidance (resumable
  # shards under <workdir>/eval/), scored against `reference` (docs/eval.md). feature_net
  # "inception": FID, sFID, IS, precision/recall (k = nearest_k) in the FID Inception, weights
  # from `inception_weights` (converted .npz or pytorch-fid's .pth), reference an ADM batch .npz,
  # an .npz of uint8 images (arr_0) or an image folder; "fmnist": FD-FMNIST, class accuracy and
  # precision/recall in the demo classifier's features, reference = the test split.
  metrics = ("fid", "sfid", "is", "precision", "recall")
  c["eval"] = dict(
      num_samples=F(50000, integer(">= 2", note="a covariance")),
      feature_net=F("inception", text("inception", "fmnist")),
      inception_weights=F("", text()), reference=F("", text()),
      # adm: the TF graph's resize and scaling.
      preprocess=F("adm", text("adm", "pytorch_fid")),
      # Images per feature-net call, over all devices (ADM: 64).
      batch_size=F(64, integer(">= 1")),
      metrics=F(metrics, tuple_of(text(*metrics), min_len=1)), nearest_k=F(3, integer(">= 1")),
      is_split_size=F(5000, integer(">= 1")),  # ADM: IS averaged over splits of 5000 samples.
      # Rows per pairwise-distance block (memory: block x N floats).
      pr_block_size=F(10000, integer(">= 1")),
      seed=F(1, integer(">= 0")))
  return c
