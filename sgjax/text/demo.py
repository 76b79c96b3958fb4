"""Text-to-image demo evaluation: sample held-out prompts with CFG, SG and CFG+SG, and score them.

  python -m sgjax.text.demo --config=configs/fashion_mnist_t2i.py --workdir=DIR

From the trained workdir's EMA weights, every rule samples `demo.eval_per_class` images per class
from the held-out prompts (`text.eval_templates`: wording never seen in training, spread evenly
over the templates) with the same seed, writes a grid `t2i_<rule>.png` (rows = classes) and
scores the samples with the FD-FMNIST classifier (sgjax.eval.fmnist): the accuracy of the
prompt's class and FD-FMNIST, beside GMACs per image (sgjax.flops). Results: t2i_metrics.json.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np

from sgjax import config as config_lib
from sgjax import files, flops, sampling, sampling_job, sharding
from sgjax.data import captions, pipeline

# Rule -> guidance overrides; ω from config.demo (omega_cfg for cfg and cfg_sg, omega_sg for sg).
RULES = {
    "none": dict(rule="none", gamma_strong=0.0),  # Unguided, dense: the baseline.
    "cfg": dict(rule="cfg", gamma_strong=0.0),
    "sg": dict(rule="sg", gamma_strong=0.0),
    "cfg_sg": dict(rule="cfg_sg", gamma_strong=0.0),
}


def prompt_batch(prompts: dict[str, np.ndarray], per_class: int) -> dict[str, np.ndarray]:
  """`per_class` prompts of every class (class-major), cycling through its held-out templates."""
  labels = prompts["label"]
  rows = []
  for k in range(int(labels.max()) + 1):
    of_k = np.flatnonzero(labels == k)
    rows.append(of_k[np.arange(per_class) % len(of_k)])
  idx = np.concatenate(rows)
  return {name: prompts[name][idx] for name in prompts}


def run(config: ml_collections.ConfigDict, workdir: str, rules=("cfg", "sg", "cfg_sg")) -> dict:
  from sgjax.eval import fmnist  # Local: the classifier is only needed here.
  log = (lambda m: print(m, flush=True)) if jax.process_index() == 0 else (lambda m: None)
  mesh = sharding.build_mesh(config.mesh)
  null = captions.null_condition(config)
  per_class = config.demo.eval_per_class
  batch = prompt_batch(captions.eval_prompts(config), per_class)
  samples = {}
  with jax.set_mesh(mesh):
    model, params, step = sampling_job.load_params(config, workdir, mesh,
                                                   ema=config.sample.use_ema)
    for rule in rules:
      c = config.copy_and_resolve_references()
      with c.unlocked():
        c.sample.guidance.update(RULES[rule])
        c.sample.guidance.omega = (1.0 if rule == "none" else
                                   config.demo["omega_sg" if rule == "sg" else "omega_cfg"])
      plan = config_lib.sampling_plan(c)
      t0 = time.perf_counter()
      images = sampling_job.generate_conditions(
          c, model, {"main": params}, {k: batch[k] for k in ("text", "text_mask")}, plan, mesh,
          config.sample.seed, null)
      log(f"sampled {len(images)} images ({rule}, ω={c.sample.guidance.omega:g}) in "
          f"{time.perf_counter() - t0:.1f}s")
      samples[rule] = (images, flops.plan_macs(c, plan), c.sample.guidance)
      grid_idx = np.concatenate([np.arange(k * per_class, k * per_class + config.sample.per_class)
                                 for k in range(10)])
      if jax.process_index() == 0:
        sampling.save_png(os.path.join(workdir, f"t2i_{rule}.png"),
                          sampling.image_grid(images[grid_idx], rows=10), scale=2)
        files.save_npz(os.path.join(workdir, f"t2i_{rule}.npz"), arr_0=images,
                       labels=batch["label"], captions=batch["caption"], step=step)

  train_split = pipeline.load_split_arrays(_raw(config), "train")
  test_split = pipeline.load_split_arrays(_raw(config), "test")
  clf = fmnist.train_or_load(os.path.join(workdir, "fmnist_classifier.msgpack"), train_split,
                             test_split, log=log)
  ref = fmnist.reference_statistics(clf, test_split[0])
  results = {}
  for rule, (images, macs, g) in samples.items():
    results[rule] = dict(fmnist.sample_metrics(clf, ref, images, batch["label"]), omega=g.omega,
                         gamma_strong=g.gamma_strong, gamma_weak=g.gamma_weak,
                         gmacs_per_image=macs.with_attention / 1e9, step=step)
  if jax.process_index() == 0:
    path = os.path.join(workdir, "t2i_metrics.json")
    merged = {}
    if files.exists(path):  # Runs of other rules stay: --rules=none adds the baseline.
      merged = json.loads(files.read_text(path))
    files.write_text(path, json.dumps(dict(merged, **results), indent=2))
    log(f"\nheld-out prompts, {len(batch['label'])} samples per rule (FD-FMNIST is not FID)")
    log(f"{'rule':7s} {'ω':>4s} {'γ s/w':>9s} {'FD-FMNIST':>10s} {'class acc':>10s} "
        f"{'GMACs/image':>12s}")
    for rule, r in results.items():
      gam = "-" if rule in ("cfg", "none") else f"{r['gamma_strong']:g}/{r['gamma_weak']:g}"
      log(f"{rule:7s} {r['omega']:4g} {gam:>9s} {r['fd_fmnist']:10.2f} "
          f"{100 * r['class_accuracy']:9.1f}% {r['gmacs_per_image']:12.3f}")
  return results


def _raw(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The plain Fashion-MNIST data config (the classifier reads the raw idx files)."""
  dc = config.data.copy_and_resolve_references()
  with dc.unlocked():
    dc.name = "fashion_mnist"
  return dc


def main(argv) -> None:
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO.
  config = flags.FLAGS.config
  config_lib.validate(config, jax.device_count())
  run(config, flags.FLAGS.workdir, tuple(flags.FLAGS.rules))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  flags.DEFINE_string("workdir", None, "The trained workdir.")
  flags.DEFINE_list("rules", ["cfg", "sg", "cfg_sg"], f"Any of {list(RULES)}.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
