"""The mechanism at each checkpoint, on held-out images: SG's branch difference against CFG's, the
token-draw noise, and the flow-matching loss at γ 0 / 0.5 / 0.9."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from sgjax import files, flow
from sgjax.data import pipeline
from sgjax.eval import fmnist
from sgjax.jobs import sweep
from sgjax.jobs.study.table import LOSS_GAMMAS, Study
from sgjax.sparsity import Sparsity


def probe(study: Study, rows: list[dict]) -> list[dict]:
  """Per checkpoint and t: the SG and CFG differences on held-out images, and the loss at γ."""
  s, c = study.config.study, study.config
  if c.data.name != "fashion_mnist":
    study.log("probe: left out (it reads held-out pixels; data.name is not fashion_mnist)")
    return []
  sg = [r for r in rows if r["rule"] == "sg"]
  if s.probe_gammas:
    gs, gw = (float(g) for g in s.probe_gammas)
  else:
    gs, gw = ((study.best(sg)["gamma_strong"], study.best(sg)["gamma_weak"]) if sg
              else (0.0, 0.5))
  path = os.path.join(study.out_dir, "probe.jsonl")
  done = {(r["checkpoint"], r["t"]): r for r in sweep.load_results(path)}
  images, labels = pipeline.load_split_arrays(c.data, "test")
  x = jnp.asarray(fmnist.to_model_units(images[:s.probe_images]))
  y = jnp.asarray(labels[:s.probe_images], jnp.int32)
  # A dense twin has no routes of its own: `probe_routes` says where its sparse branches drop
  # tokens (the routed model's, so the two are probed alike).
  routes = (Sparsity.from_routes(s.probe_routes) if s.probe_routes and not c.sparsity.routes
            else Sparsity.from_config(c.sparsity))
  steps = sorted(int(v) for v in s.checkpoints) if s.checkpoints else study.saved
  net = study.params("main", steps[-1])[0]  # One model; only its checkpoints differ.
  v = jax.jit(lambda p, xt, t, y, k, sp: net.apply({"params": p}, xt, t, y, sparsity=sp,
                                                   token_key=k), static_argnums=5)
  null = jnp.full_like(y, net.num_classes)
  for step in steps:
    if all((step, float(t)) in done for t in s.probe_ts):
      continue
    params = study.params("main", step)[1]
    for t in s.probe_ts:
      key_ = jax.random.fold_in(jax.random.key(s.seed), int(1000 * t))
      noise = jax.random.normal(key_, x.shape)
      tt = jnp.full((len(x),), t, jnp.float32)
      xt = flow.interpolate(x, noise, tt)
      target = flow.target_velocity(x, noise)
      flat = lambda a: np.asarray(a).reshape(len(x), -1)
      d_sg, d_cfg, d_draw, loss = [], [], [], {g: [] for g in LOSS_GAMMAS}
      for d in range(s.probe_draws):
        k = jax.random.fold_in(key_, d)
        ks = jax.random.split(k, 3 + len(LOSS_GAMMAS))
        v_c = v(params, xt, tt, y, ks[0], Sparsity())
        d_cfg.append(flat(v_c - v(params, xt, tt, null, ks[0], Sparsity())))
        v_weak = v(params, xt, tt, y, ks[1], routes.with_gamma(gw))
        d_sg.append(flat(v(params, xt, tt, y, ks[0], routes.with_gamma(gs)) - v_weak))
        # Token-draw noise: the weak branch at two draws of its kept tokens (ω amplifies it).
        d_draw.append(flat(v_weak - v(params, xt, tt, y, ks[2], routes.with_gamma(gw))))
        for g, kg in zip(LOSS_GAMMAS, ks[3:], strict=True):
          loss[g].append(float(jnp.mean((v(params, xt, tt, y, kg, routes.with_gamma(g))
                                         - target) ** 2)))
      d_sg, d_cfg, d_draw = (np.concatenate(a) for a in (d_sg, d_cfg, d_draw))
      n_sg, n_cfg = np.linalg.norm(d_sg, axis=1), np.linalg.norm(d_cfg, axis=1)
      cos = (d_sg * d_cfg).sum(1) / np.maximum(n_sg * n_cfg, 1e-12)
      done[(step, float(t))] = dict(
          checkpoint=step, t=float(t), gamma_strong=gs, gamma_weak=gw,
          sg_diff_norm=float(n_sg.mean()), cfg_diff_norm=float(n_cfg.mean()),
          cosine=float(cos.mean()), cosine_std=float(cos.std()),
          draw_noise_norm=float(np.linalg.norm(d_draw, axis=1).mean()),
          **{f"loss_gamma{g:g}": float(np.mean(loss[g])) for g in LOSS_GAMMAS})
      r = done[(step, float(t))]
      study.log(f"probe @{step} t={t:g}: ‖ΔSG‖ {r['sg_diff_norm']:.3f}, ‖ΔCFG‖ "
                f"{r['cfg_diff_norm']:.3f}, cos {r['cosine']:.3f}, draw noise "
                f"{r['draw_noise_norm']:.3f}; loss γ0 "
                f"{r['loss_gamma0']:.4f} γ0.5 {r['loss_gamma0.5']:.4f} γ0.9 "
                f"{r['loss_gamma0.9']:.4f}")
    if jax.process_index() == 0:
      files.makedirs(study.out_dir)
      files.write_text(path, "".join(json.dumps(r) + "\n" for r in done.values()))
  return sorted(done.values(), key=lambda r: (r["checkpoint"], r["t"]))

