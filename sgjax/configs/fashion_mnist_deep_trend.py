"""Does SG's edge appear with training? (issue 30, docs/results.md): the fair comparison at
log-spaced checkpoints of one long run of `fashion_mnist_deep.py` (route 1->10 of 12 at γ 0.5).

  python -m sgjax.main --config=sgjax/configs/fashion_mnist_deep.py --workdir=RUN --mode=train
  python -m sgjax.jobs.study --config=sgjax/configs/fashion_mnist_deep_trend.py --workdir=RUN \
      --config.study.checkpoints="(2000,4000,8000,16000,32000)"

The training fields are the deep config's (so its workdir accepts this file); only `study`
differs. At each checkpoint (stage "trend"): the budget search at CFG's cost at 12 Euler steps
(every rule at the most steps within it), ω re-bracketed for every rule and γ_weak for the
sparse ones (the grid 0.3-0.9 pushed to 0.2 or 0.95 where its best sits on an edge: both optima
move with training); finals at 2,000 samples for unguided, CFG, SG, autoguidance and AG+SG
(constant γ, and the paper's cosine schedule γ 0->0.6 on the main model, 0.6->0 on the guide),
each AG rule with the guide at 1/16 of the main model's steps (autoguidance's recipe) and at
the fixed step 500; paired intervals; the probe at every checkpoint. Add
`--config.study.token_draws="('step','trajectory')"` at the last checkpoint for SG with the weak
branch's tokens drawn once per trajectory beside the per-step draw.
"""

from sgjax.configs import fashion_mnist_deep


def get_config():
  c = fashion_mnist_deep.get_config()
  c.study.update(stages=("trend",), search="budget", steps=(12,), per_class=10,
                 final_per_class=200, bootstrap=300, top_settings=1,
                 cfg_omegas=(1.5, 2.0, 3.0), cfg_intervals=((0.25, 1.0),),
                 omegas=(2.0, 4.0, 8.0), gammas_strong=(0.0,), gammas_weak=(0.3, 0.5, 0.7, 0.9),
                 omega_extensions=3, gamma_extensions=2, rules=("cfg", "sg", "ag_sg"),
                 final_families=(), guides=(0.0625, 500.0), ag_cosine=(0.0, 0.6, 0.6, 0.0),
                 token_draws=("step",), probe_gammas=(0.0, 0.9), probe_routes=((1, 10, 0.5),),
                 probe_images=100, probe_draws=2)
  return c
