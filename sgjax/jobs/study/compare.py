"""Two models, one paired comparison: each family's final row at a checkpoint of one run against
the same family's at a checkpoint of another (`python -m sgjax.jobs.study.compare`).

  python -m sgjax.jobs.study.compare --config=CFG --workdir=A --step=N --other=B --other_step=M

Both checkpoints must have been studied by the trend stage (`study/trend/step_<N>/finals.jsonl`
and its features): each run got the same search, so each family's row is that model's best.
Every final row samples the same labels from the same initial noise at a seed, so A's row and B's
row of a family are paired sample by sample, and the interval (a paired bootstrap) is that of the
difference A − B. Beside each family, the difference of gains: (A f − A g) − (B f − B g) for the
study's pairs (e.g. SG − CFG), which says whether a model responds to a rule as the other does.

The two runs' samples must be judged by one feature net: on Fashion-MNIST both workdirs' cached
classifiers must be the same file (copy A's into B before B's study).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from sgjax import errors, files, platform, readers, validation
from sgjax.jobs.study.finals import paired_difference, pairs_of
from sgjax.jobs.study.table import Study, families_of, family, label
from sgjax.jobs.study.training import step_dir

CLASSIFIER = "fmnist_classifier.msgpack"


def studied(config: ml_collections.ConfigDict, workdir: str, step: int, flag: str
            ) -> tuple[Study, list[dict]]:
  """(the Study of `workdir` at `step`, its chosen final rows)."""
  root = Study(config, workdir)
  at = Study(config, workdir, root.log, step=step, out_dir=step_dir(root, step))
  path = os.path.join(at.out_dir, "finals.jsonl")
  if not files.exists(path):
    raise errors.UserError(f"{flag} = {step}", f"{path} does not exist (checkpoint {step} of "
                           f"{workdir} has not been studied by the trend stage)",
                           "run `python -m sgjax.jobs.study` with --config.study.stages="
                           f"\"('trend',)\" --config.study.checkpoints=\"({step},)\" first")
  return at, readers.jsonl(path, "study table", f"move {path} aside and rerun the trend stage")


def same_judge(config: ml_collections.ConfigDict, a: str, b: str) -> None:
  """Refuses two Fashion-MNIST workdirs whose cached classifiers differ (their features would
  live in two spaces); the Inception judge is one fixed file for both."""
  if config.data.name != "fashion_mnist":
    return
  pa, pb = (os.path.join(w, CLASSIFIER) for w in (a, b))
  for p in (pa, pb):
    if not files.exists(p):
      raise errors.UserError(p, "no classifier there (the study trains and caches one)",
                             "study both checkpoints first")
  if files.read_bytes(pa) != files.read_bytes(pb):
    raise errors.UserError(pb, f"another FD-FMNIST classifier than {pa} (features of two "
                           "classifiers cannot be paired)",
                           f"copy {pa} over it before B's study (its rows must be rescored)")


def compare(config: ml_collections.ConfigDict, workdir: str, step: int, other: str,
            other_step: int) -> list[dict]:
  """One row per family final in both (A − B) and per study pair of families present in both
  ((A f − A g) − (B f − B g)), at each shared budget and seed."""
  same_judge(config, workdir, other)
  a, rows_a = studied(config, workdir, step, "--step")
  b, rows_b = studied(config, other, other_step, "--other_step")
  b._judge = a.judge()
  s, m = config.study, a.metric
  index = lambda rows: {(round(r["budget"], 6), family(r), r.get("seed", s.seed)): r
                        for r in rows}
  ia, ib = index(rows_a), index(rows_b)
  feats = lambda study, r: study.features_of(r)
  out = []
  for budget, seed in sorted({(k[0], k[2]) for k in ia} & {(k[0], k[2]) for k in ib}):
    at = lambda i, f, budget=budget, seed=seed: i.get((budget, f, seed))
    head = dict(budget=budget, seed=seed, a_step=step, b_step=other_step)
    for f in families_of(rows_a):
      ra, rb = at(ia, f), at(ib, f)
      if ra is None or rb is None:
        continue
      out.append(dict(head, family=f, a_label=label(ra), b_label=label(rb),
                      a=ra[m], b=rb[m], **paired_difference(
                          [feats(a, ra)], [feats(b, rb)], a.judge(), max(s.bootstrap, 2),
                          seed, m)))
    for f, g in pairs_of(families_of(rows_a)):
      if not (isinstance(f, str) and isinstance(g, str)):
        continue  # The dense twin's pairs belong to one study.
      r = [at(ia, f), at(ia, g), at(ib, f), at(ib, g)]
      if any(x is None for x in r):
        continue
      out.append(dict(head, family=f"({f} − {g})", a=r[0][m] - r[1][m], b=r[2][m] - r[3][m],
                      **paired_difference([feats(a, r[0]), feats(b, r[3])],
                                          [feats(a, r[1]), feats(b, r[2])], a.judge(),
                                          max(s.bootstrap, 2), seed, m)))
  return out


def table(rows: list[dict], metric: str, name_a: str, name_b: str) -> str:
  """The comparison as a markdown table."""
  out = [f"| family | A: {name_a} | B: {name_b} | A − B (paired 95%) |", "|---|---|---|---|"]
  for r in rows:
    d = f"{r[f'd_{metric}']:+.2f} [{r[f'd_{metric}_lo']:+.2f}, {r[f'd_{metric}_hi']:+.2f}]"
    out.append(f"| {r['family']} | {r['a']:.2f} | {r['b']:.2f} | {d} |")
  return "\n".join(out)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  platform.set_default_xla_flags(sampling=True)
  fl = flags.FLAGS
  if fl.config is None or not fl.workdir or not fl.other:
    raise errors.UserError("--config, --workdir, --other", "required", "pass all three")
  if fl.out and files.exists(fl.out):
    raise errors.UserError(f"--out={fl.out}", "exists (never overwritten)",
                           "a new path, or move it aside")
  validation.validate(fl.config, jax.device_count(), job="study")
  rows = compare(fl.config, fl.workdir, fl.step, fl.other, fl.other_step)
  if not rows:
    raise errors.UserError("--other", "no final row shares a family, budget and seed with "
                           f"{fl.workdir}'s", "study both with the same study.* settings")
  metric = next(k.removeprefix("d_") for k in rows[0] if k.startswith("d_"))
  text = table(rows, metric, f"{fl.workdir}@{fl.step}", f"{fl.other}@{fl.other_step}")
  if fl.out and jax.process_index() == 0:
    files.write_text(fl.out, "".join(json.dumps(r) + "\n" for r in rows))
  print(text)


def cli() -> None:
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  flags.DEFINE_string("workdir", None, "Run A.")
  flags.DEFINE_integer("step", None, "A's studied checkpoint.", required=True)
  flags.DEFINE_string("other", None, "Run B.")
  flags.DEFINE_integer("other_step", None, "B's studied checkpoint.", required=True)
  flags.DEFINE_string("out", "", "Also write the rows here as JSON lines (a new file).")
  errors.run(main)


if __name__ == "__main__":
  cli()
