"""`--mode=demo` (after training): guided rules side by side from one checkpoint and seed, scored.

A class-conditional model samples unguided, CFG and SG (`demo.eval_per_class` images per class
each) at matched compute: SG at `sample.steps` sets the budget (GMACs per image), and the other
rules take the most sampler steps that stay within it. Grids samples_<rule>.png (the first
`sample.per_class` of each class) and, on Fashion-MNIST, FD-FMNIST and class accuracy beside
steps and GMACs per image (demo_metrics.json).

A text model (`python -m sgjax.jobs.demo`, or `--mode=demo` of a text config) samples held-out
prompts (`text.eval_templates`: wording never seen in training, spread evenly over the
templates) with CFG, SG and CFG+SG (and `none` on request): grids t2i_<rule>.png (rows =
classes), scored with the same classifier on the prompt's class (t2i_metrics.json).

Every rule samples through the workdir's one pipeline (sgjax.pipeline): its weights load once.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import flags, logging

from sgjax import config as config_lib
from sgjax import (
  errors,
  files,
  flops,
  generate,
  metrics,
  models,
  pipeline,
  readers,
  sharding,
  validation,
)
from sgjax import guidance as guidance_lib
from sgjax.data import captions
from sgjax.eval import fmnist

CLASS_RULES = ("none", "cfg", "sg")
MATCHED_TO = "sg"  # The rule whose cost at sample.steps the others are matched to.
TEXT_RULES = ("none", "cfg", "sg", "cfg_sg")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             job: str = "demo") -> None:
  """What a demo reads: `job`'s fields (`--mode=demo` trains first; the text demo samples a
  trained workdir: "sample"), and `demo` (its declared values: no field depends on another)."""
  validation.validate(config, num_devices, job=job)
  validation.check_fields(config, ("demo",))


def rule_config(config: ml_collections.ConfigDict, rule: str) -> ml_collections.ConfigDict:
  """The demo's setting of `rule`: ω from config.demo (1 for none, omega_sg for sg, omega_cfg
  otherwise), the configured γs (none: the dense model), no evaluation set."""
  omega = 1.0 if rule == "none" else config.demo["omega_sg" if rule == "sg" else "omega_cfg"]
  fields = {"sample.guidance.rule": rule, "sample.guidance.omega": omega,
            "sample.num_samples": 0}
  if rule == "none":
    fields["sample.guidance.gamma_strong"] = 0.0
  return config_lib.replace(config, fields)


def gmacs(config: ml_collections.ConfigDict) -> float:
  return flops.plan_macs(config, guidance_lib.config_plan(config)).with_attention / 1e9


def matched_config(config: ml_collections.ConfigDict, rule: str, budget: float
                   ) -> ml_collections.ConfigDict:
  """`rule_config` with the most sampler steps (≤ 4 × sample.steps) whose GMACs per image stay
  within `budget` (at least one step)."""
  c = rule_config(config, rule)
  best = config_lib.replace(c, {"sample.steps": 1})
  for n in range(2, 4 * config.sample.steps + 1):
    cn = config_lib.replace(c, {"sample.steps": n})
    if gmacs(cn) > budget * (1 + 1e-9):
      break  # Cost grows with steps.
    best = cn
  return best


def text_rule_config(config: ml_collections.ConfigDict, rule: str) -> ml_collections.ConfigDict:
  """The text demo's setting: as `rule_config`, with a dense strong branch (γ_strong = 0)."""
  return config_lib.replace(rule_config(config, rule), {"sample.guidance.gamma_strong": 0.0})


def _table(results: dict, width: int, header: str, note: str = "") -> None:
  if header:
    metrics.print0(header)
  metrics.print0(f"{'rule':{width}s} {'ω':>4s} {'γ s/w':>9s} {'steps':>5s} {'FD-FMNIST':>10s} "
                 f"{'class acc':>10s} {'GMACs/image':>12s}{note}")
  for rule, r in results.items():
    b = guidance_lib.RULE_BRANCHES[rule]
    gam = f"{r['gamma_strong']:g}/{r['gamma_weak']:g}" if b.sparse and b.weak else "-"
    metrics.print0(f"{rule:{width}s} {r['omega']:4g} {gam:>9s} {r['steps']:5d} "
                   f"{r['fd_fmnist']:10.2f} {100 * r['class_accuracy']:9.1f}% "
                   f"{r['gmacs_per_image']:12.3f}")


def _score(config, workdir: str, samples: dict, labels: np.ndarray, **extra) -> dict:
  clf, ref, _ = fmnist.for_workdir(config.data, workdir, log=metrics.print0)
  results = {}
  for rule, (images, macs, g, steps) in samples.items():
    results[rule] = dict(fmnist.sample_metrics(clf, ref, images, labels), omega=g.omega,
                         gamma_strong=g.gamma_strong, gamma_weak=g.gamma_weak, steps=steps,
                         gmacs_per_image=macs.with_attention / 1e9, **extra)
  return results


def run(config: ml_collections.ConfigDict, workdir: str) -> tuple[list[str], dict]:
  """The demo of the configured model: (grid paths, metrics by rule)."""
  if models.conditioning(config) == "text":
    results = run_text(config, workdir)
    return [os.path.join(workdir, f"t2i_{rule}.png") for rule in results], results
  per_class = max(config.demo.eval_per_class, config.sample.per_class)
  mesh = sharding.build_mesh(config.mesh)
  samples, paths = {}, []
  budget = gmacs(rule_config(config, MATCHED_TO))
  pipe = pipeline.from_workdir(workdir, config, mesh=mesh)
  model, step = pipe.model, pipe.step
  labels = generate.class_labels(model.num_classes, per_class)
  for rule in CLASS_RULES:
    c = matched_config(config, rule, budget)
    plan = guidance_lib.config_plan(c)
    t0 = time.perf_counter()
    images = pipe.images(c, labels)
    metrics.print0(f"sampled {len(images)} images ({rule}, ω={c.sample.guidance.omega:g}, "
                   f"{c.sample.steps} steps) in {time.perf_counter() - t0:.1f}s")
    samples[rule] = (images, flops.plan_macs(c, plan), c.sample.guidance, c.sample.steps)
    paths.append(os.path.join(workdir, f"samples_{rule}.png"))
    if jax.process_index() == 0:
      # The .npz holds all eval_per_class images per class; the grid the first per_class.
      generate.save_grid(c, workdir, f"samples_{rule}",
                         generate.grid_rows(images, model.num_classes, config.sample.per_class),
                         model.num_classes, step, images, labels=labels)
  if config.data.name != "fashion_mnist":
    return paths, {}
  results = _score(config, workdir, samples, labels)
  if jax.process_index() == 0:
    files.write_text(os.path.join(workdir, "demo_metrics.json"), json.dumps(results, indent=2))
  _table(results, 5, f"at matched compute ({budget:.2f} GMACs/image at most: {MATCHED_TO} at "
         f"{config.sample.steps} steps)", f"   ({len(labels)} samples per rule; FD-FMNIST is "
         "not FID)")
  return paths, results


def prompt_batch(prompts: dict[str, np.ndarray], per_class: int) -> dict[str, np.ndarray]:
  """`per_class` prompts of every class (class-major), cycling through its held-out templates."""
  labels = prompts["label"]
  rows = []
  for k in range(int(labels.max()) + 1):
    of_k = np.flatnonzero(labels == k)
    rows.append(of_k[np.arange(per_class) % len(of_k)])
  idx = np.concatenate(rows)
  return {name: prompts[name][idx] for name in prompts}


def run_text(config: ml_collections.ConfigDict, workdir: str,
             rules=("cfg", "sg", "cfg_sg")) -> dict:
  """The text-to-image demo: held-out prompts per rule, grids and t2i_metrics.json."""
  mesh = sharding.build_mesh(config.mesh)
  null = captions.null_condition(config)
  per_class = config.demo.eval_per_class
  batch = prompt_batch(captions.eval_prompts(config), per_class)
  num_classes = int(batch["label"].max()) + 1
  cond = {k: batch[k] for k in ("text", "text_mask")}
  samples = {}
  pipe = pipeline.from_workdir(workdir, config, mesh=mesh)
  step = pipe.step
  for rule in rules:
    c = text_rule_config(config, rule)
    plan = guidance_lib.config_plan(c)
    t0 = time.perf_counter()
    images = pipe.images(c, cond, null)
    metrics.print0(f"sampled {len(images)} images ({rule}, ω={c.sample.guidance.omega:g}) "
                   f"in {time.perf_counter() - t0:.1f}s")
    samples[rule] = (images, flops.plan_macs(c, plan), c.sample.guidance, c.sample.steps)
    if jax.process_index() == 0:
      generate.save_grid(c, workdir, f"t2i_{rule}",
                         generate.grid_rows(images, num_classes, config.sample.per_class),
                         num_classes, step, images, labels=batch["label"],
                         captions=batch["caption"])
  results = _score(config, workdir, samples, batch["label"], step=step)
  if jax.process_index() == 0:
    path = os.path.join(workdir, "t2i_metrics.json")
    merged = {}
    if files.exists(path):  # Runs of other rules stay: --rules=none adds the baseline.
      merged = readers.json_object(path, "metrics file", f"move {path} aside and rerun")
    files.write_text(path, json.dumps(dict(merged, **results), indent=2))
  _table(results, 7, f"\nheld-out prompts, {len(batch['label'])} samples per rule "
         "(FD-FMNIST is not FID)")
  return results


def text_main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO.
  config = flags.FLAGS.config
  validate(config, jax.device_count(), job="sample")
  run_text(config, flags.FLAGS.workdir, tuple(flags.FLAGS.rules))


def text_cli() -> None:
  """`python -m sgjax.jobs.demo --config=… --workdir=… [--rules=cfg,sg,cfg_sg]` (= the
  `sgjax-t2i-demo` command): the text demo of a trained workdir."""
  from ml_collections import config_flags  # Local: defines flags, only for this command.
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  flags.DEFINE_string("workdir", None, "The trained workdir.")
  flags.DEFINE_list("rules", ["cfg", "sg", "cfg_sg"], f"Any of {list(TEXT_RULES)}.")
  flags.mark_flags_as_required(["config", "workdir"])
  errors.run(text_main)


if __name__ == "__main__":
  text_cli()
