"""Over training: each rule's best setting rescored at every checkpoint (the paper's Fig. 5)."""

from __future__ import annotations

from sgjax import errors
from sgjax.jobs.study.table import FAMILIES, Study, family


def checkpoints_stage(study: Study, rows: list[dict]) -> list[dict]:
  s = study.config.study
  steps = sorted(int(x) for x in s.checkpoints) if s.checkpoints else study.saved
  missing = sorted(set(steps) - set(study.saved))
  if missing:
    raise errors.UserError(f"study.checkpoints = {tuple(s.checkpoints)!r}",
                           f"no checkpoint of steps {missing}", f"kept: {study.saved}")
  points = []
  for fam in FAMILIES:
    mine = [r for r in rows if family(r) == fam]
    if not mine:
      continue
    b = study.best(mine)
    for step in steps:
      if b["guide_step"] >= 0 and step <= b["guide_step"]:
        continue  # AG+SG needs a guide older than the model.
      points.append(dict(b, checkpoint=step))
  return study.run(points, "checkpoints")

