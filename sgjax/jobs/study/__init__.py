"""Where does Sparse Guidance beat CFG? The guidance rules compared at matched compute.

  python -m sgjax.jobs.study --config=configs/fashion_mnist_study.py --workdir=DIR \
      [--config.study.dense_workdir=DENSE_DIR] [--config.study.stages="(…)"]

Stages (`study.stages`, each resumable: every scored point is one JSON line of
`<workdir>/study/points.jsonl`, and a point already there is never sampled again):

  screen       at the latest checkpoint, `study.per_class` samples per class a point:
               unguided (rule none) at each γ of `unguided_gammas` (the paper's Fig. 4),
               then `steps` at the best γ;
               CFG at every ω × steps, and with each guidance interval at its best ω;
               SG, CFG+SG and AG+SG searched coordinate-wise: γ_strong × γ_weak at `omega_ref`
               and `steps_ref` (CFG+SG and AG+SG over SG's 3 best pairs; AG+SG also at γ 0/0,
               autoguidance alone), then ω at the best pair, then steps at the best ω.
  final        the matched comparison: at each compute level (`budgets` GMACs/image, default
               CFG's at each steps), the best screened setting of each rule within it, scored
               again with `final_per_class` samples per class and a 95% interval (bootstrap).
  checkpoints  each rule's best setting at every checkpoint of `checkpoints` (the paper's
               Fig. 5: quality vs training step).
  dense        `dense_workdir`, a dense-trained twin: unguided and CFG over `cfg_omegas`,
               beside the same on this model (the paper's Fig. 2: CFG's gain on each).
  probe        the mechanism at each checkpoint, on held-out images at each t of `probe_ts`:
               ‖v(c;γs) − v(c;γw)‖ against ‖v(c) − v(∅)‖ and their cosine, and the flow
               matching loss at γ 0 / 0.5 / 0.9 (pixel data only).

Every point samples the same labels with the same seed (common random numbers: differences
between settings are not sampling noise of the seed). The judge is FD-FMNIST and class
accuracy for Fashion-MNIST, else FID in the Inception network of `eval.inception_weights`
against `eval.reference` (docs/eval.md). `report.md` and the plots go beside the table.

One module per concern: `table` (points, the judge, `Study`), `search` (the screens), `finals`
(matched comparison, paired differences), `probe`, `training` (over checkpoints), `report`
(report.md, plots), `job` (the command), `compare` (two runs' finals paired:
`python -m sgjax.jobs.study.compare`).
"""

from sgjax.jobs.study.finals import final, paired, paired_difference
from sgjax.jobs.study.job import cli, main, run
from sgjax.jobs.study.probe import probe
from sgjax.jobs.study.report import log_tensorboard, plot, report
from sgjax.jobs.study.search import (
  POINT_FIELDS,
  bracket_omega,
  budget_levels,
  budgets,
  dense_stage,
  everywhere,
  fit_steps,
  guide_fields,
  guide_step,
  reference_budget,
  screen,
  screen_budget,
  top,
)
from sgjax.jobs.study.table import (
  ALL_RULES,
  FAMILIES,
  FULL,
  GAIN_PAIRS,
  LOSS_GAMMAS,
  MAX_STEPS,
  PAIRS,
  SEARCHED,
  SEARCHES,
  STAGES,
  TOP_PAIRS,
  Judge,
  Study,
  check,
  diversity,
  family,
  judge_for,
  key,
  label,
  point,
)
from sgjax.jobs.study.training import checkpoints_stage

__all__ = [
    "ALL_RULES",
    "FAMILIES",
    "FULL",
    "GAIN_PAIRS",
    "Judge",
    "LOSS_GAMMAS",
    "MAX_STEPS",
    "PAIRS",
    "POINT_FIELDS",
    "SEARCHED",
    "SEARCHES",
    "STAGES",
    "Study",
    "TOP_PAIRS",
    "bracket_omega",
    "budget_levels",
    "budgets",
    "check",
    "checkpoints_stage",
    "cli",
    "dense_stage",
    "diversity",
    "everywhere",
    "family",
    "final",
    "fit_steps",
    "guide_fields",
    "guide_step",
    "judge_for",
    "key",
    "label",
    "log_tensorboard",
    "main",
    "paired",
    "paired_difference",
    "plot",
    "point",
    "probe",
    "reference_budget",
    "report",
    "run",
    "screen",
    "screen_budget",
    "top",
]
