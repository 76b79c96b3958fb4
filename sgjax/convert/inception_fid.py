"""pytorch-fid's Inception weights (`pt_inception-2015-12-05-6726825d.pth`) -> our Flax variables.

  python -m third_party.inception_fid --src=pt_inception-2015-12-05-6726825d.pth \
      --out=inception_fid.npz

Convert once; then point `eval.inception_weights` at the .npz (a .pth works too, but needs
torch at every run). Nothing is downloaded: the user supplies the file. The state dict is the
TF graph `inception-2015-12-05` ported by pytorch-fid: 94 `BasicConv2d` (conv weight + BN
weight, bias, running_mean, running_var) and `fc.weight`/`fc.bias`, 472 tensors;
`num_batches_tracked` buffers, where present, carry no weights and are ignored.

Flax names mirror the torch ones (see sgjax/eval/inception.py), so the mapping is mechanical:
  X.conv.weight (O, I, kh, kw)     -> params/X/conv/kernel (kh, kw, I, O)
  X.bn.weight / X.bn.bias          -> params/X/bn/scale / params/X/bn/bias
  X.bn.running_mean / running_var  -> batch_stats/X/bn/mean / batch_stats/X/bn/var
  fc.weight (1008, 2048) / fc.bias -> params/fc/kernel (2048, 1008) / params/fc/bias
Coverage is checked both ways: every source tensor used, every target variable filled, every
shape equal; a mismatch raises with the offending names.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from sgjax import errors, files, readers
from sgjax.eval import inception

IGNORED_SUFFIXES = (".num_batches_tracked",)  # BN step counters: not weights.
# Flax (collection, leaf name) -> torch suffix, per module kind.
_CONV_BN = {("params", "conv", "kernel"): "conv.weight", ("params", "bn", "scale"): "bn.weight",
            ("params", "bn", "bias"): "bn.bias", ("batch_stats", "bn", "mean"): "bn.running_mean",
            ("batch_stats", "bn", "var"): "bn.running_var"}


SOURCE_ALLOWED = "pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ALLOWED = ("a converted .npz (python -m sgjax.convert.inception_fid) or pytorch-fid's "
                   ".pth; see docs/eval.md")


def load_state_dict(src: str | Mapping[str, Any], where: str = "") -> dict[str, np.ndarray]:
  """Numpy arrays from a .pth path (sgjax.readers: weights_only=True; one line naming the file
  if it cannot be read) or a mapping."""
  if isinstance(src, str):
    src = readers.tensor_file(src, where or src, SOURCE_ALLOWED)
  return {k: readers.to_numpy(v) for k, v in src.items()}


def _torch_key(collection: str, path: tuple[str, ...]) -> tuple[str, Any]:
  """(torch key, transform) of one Flax variable."""
  if path[0] == "fc":
    assert collection == "params", path
    return ("fc.weight", np.transpose) if path[-1] == "kernel" else ("fc.bias", None)
  suffix = _CONV_BN[(collection, *path[-2:])]
  transform = (lambda w: np.transpose(w, (2, 3, 1, 0))) if suffix == "conv.weight" else None
  return ".".join((*path[:-2], suffix)), transform


def convert(state_dict: Mapping[str, Any], where: str = "the Inception state dict"
            ) -> dict[str, Any]:
  """{"params", "batch_stats"} for sgjax.eval.inception.InceptionV3, float32 numpy leaves.
  A state dict that does not fit is a UserError naming `where` and each problem."""
  sd = load_state_dict(state_dict)
  template = inception.variables_template()
  flat = traverse_util.flatten_dict(template)
  out, used, problems = {}, set(), []
  for (collection, *path), spec in flat.items():
    key, transform = _torch_key(collection, tuple(path))
    if key not in sd:
      problems.append(f"missing source tensor {key!r} (for {collection}/{'/'.join(path)})")
      continue
    value = np.asarray(sd[key], np.float32)
    value = transform(value) if transform else value
    used.add(key)
    if value.shape != spec.shape:
      problems.append(f"{key!r}: shape {sd[key].shape} does not give {collection}/"
                      f"{'/'.join(path)} {spec.shape}")
      continue
    out[(collection, *path)] = np.ascontiguousarray(value)
  unexpected = sorted(k for k in sd if k not in used and not k.endswith(IGNORED_SUFFIXES))
  problems += [f"unexpected source tensor {k!r} {np.shape(sd[k])}" for k in unexpected]
  if problems:
    raise errors.UserError(where, f"{len(problems)} problem(s) converting it to the FID "
                           "Inception: " + "; ".join(problems[:6])
                           + (" ..." if len(problems) > 6 else ""), SOURCE_ALLOWED)
  return traverse_util.unflatten_dict(out)


def save(variables: Mapping[str, Any], path: str) -> None:
  """Converted variables as .npz, keys 'collection/module/.../leaf' (written atomically)."""
  if not path.endswith(".npz"):
    raise errors.UserError(f"--out={path}", "converted weights are saved as .npz",
                           "pass a path ending in .npz")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  flat = traverse_util.flatten_dict(variables, sep="/")
  with open(path + ".tmp", "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
  os.replace(path + ".tmp", path)


def load(path: str, where: str = "") -> dict[str, Any]:
  """Variables from a .pth (converted now) or a converted .npz; names and shapes checked."""
  where = where or f"eval.inception_weights = {path!r}"
  if path.endswith((".pth", ".pt")):
    return convert(load_state_dict(path, where), where)
  if not path.endswith(".npz"):
    raise errors.UserError(where, "is neither a .pth nor an .npz", WEIGHTS_ALLOWED)
  variables = traverse_util.unflatten_dict(readers.npz(path, where, WEIGHTS_ALLOWED), sep="/")
  want = traverse_util.flatten_dict(inception.variables_template(), sep="/")
  got = traverse_util.flatten_dict(variables, sep="/")
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  bad = [k for k in set(want) & set(got) if tuple(np.shape(got[k])) != want[k].shape]
  if missing or extra or bad:
    raise errors.UserError(where, f"not converted FID Inception weights: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}, wrong shape {sorted(bad)[:5]} "
                           f"({len(missing)}/{len(extra)}/{len(bad)} in all)", WEIGHTS_ALLOWED)
  return variables


class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors are the project's one `error:` line and exit 2."""

  def error(self, message):
    errors.exit_with(errors.UserError("flags", message, "see --help"))


def main(argv=None) -> None:
  p = _Parser(description=__doc__.split("\n")[0])
  p.add_argument("--src", required=True, help="pt_inception-2015-12-05-6726825d.pth")
  p.add_argument("--out", required=True, help="output .npz")
  args = p.parse_args(argv)
  if files.exists(args.out):
    raise errors.UserError(f"--out={args.out}", "exists",
                           "pass a new path; an existing file is never overwritten")
  where = f"--src={args.src}"
  variables = convert(load_state_dict(args.src, where), where)
  save(variables, args.out)
  n = sum(np.size(v) for v in traverse_util.flatten_dict(variables).values())
  print(f"wrote {args.out}: {n:,} numbers")


def load_variables(path: str):
  """Converted weights (.npz from this converter) or a .pth directly."""
  where = f"eval.inception_weights = {path!r}"
  if not path:
    raise errors.UserError(where, "not set", WEIGHTS_ALLOWED)
  readers.check_file(path, where, WEIGHTS_ALLOWED)
  return load(path, where)


def cli() -> None:
  """`python -m sgjax.convert.inception_fid --src=… --out=…` (argparse, the same one line)."""
  errors.guard(main)()


if __name__ == "__main__":
  cli()
