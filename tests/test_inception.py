"""The FID Inception port: converter coverage, and the forward pass against a torch reference.

No real weights exist on these machines, so the tests generate a state dict with the real key
names and shapes of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` from an architecture
table written here (not read from our module), and compare our Flax forward with a forward
written with torch.nn.functional from that table: the same conv / BN / pooling semantics as
pytorch-fid's modules (avg pool with count_include_pad=False, max pool in Mixed_7c), NCHW.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ml_collections import ConfigDict
from PIL import Image

from sgjax import checkpoint, models
from sgjax import state as state_lib
from sgjax.convert import inception_fid
from sgjax.eval import inception
from sgjax.jobs import evaluate as eval_job
from tests import builders
from tests.builders import CONVS, inception_state_dict, tiny_config


def make_state_dict(seed=0, with_counters=True):
  """The builder's random Inception weights as the torch tensors a .pth file holds."""
  return {k: torch.from_numpy(v) for k, v in inception_state_dict(seed, with_counters).items()}


# ------------------------------------------------------------------ torch reference forward
def _basic(sd, name, x):
  *_, s, ph, pw = CONVS[name]
  x = F.conv2d(x, sd[f"{name}.conv.weight"], stride=s, padding=(ph, pw))
  x = F.batch_norm(x, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"],
                   sd[f"{name}.bn.weight"], sd[f"{name}.bn.bias"], training=False, eps=1e-3)
  return F.relu(x)


def _chain(sd, block, names, x):
  for n in names:
    x = _basic(sd, f"{block}.{n}", x)
  return x


def _avg(x):
  return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def reference_forward(sd, images_nhwc_uint8):
  """pool, spatial (mixed_6/conv[..., :7] flattened HWC), bias-free logits; 'adm' preprocess."""
  x = _tf1_resize(images_nhwc_uint8.astype(np.float64), 299).astype(np.float32)
  x = torch.from_numpy((x - 128.0) / 128.0).permute(0, 3, 1, 2)
  for n in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
    x = _basic(sd, n, x)
  x = F.max_pool2d(x, 3, 2)
  x = _basic(sd, "Conv2d_4a_3x3", _basic(sd, "Conv2d_3b_1x1", x))
  x = F.max_pool2d(x, 3, 2)
  for b in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = torch.cat([_basic(sd, f"{b}.branch1x1", x),
                   _chain(sd, b, ("branch5x5_1", "branch5x5_2"), x),
                   _chain(sd, b, ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"), x),
                   _basic(sd, f"{b}.branch_pool", _avg(x))], 1)
  x = torch.cat([_basic(sd, "Mixed_6a.branch3x3", x),
                 _chain(sd, "Mixed_6a", ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                        x), F.max_pool2d(x, 3, 2)], 1)
  for b in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    b1 = _basic(sd, f"{b}.branch1x1", x)
    if b == "Mixed_6d":
      spatial = b1[:, :7].permute(0, 2, 3, 1).reshape(len(b1), -1)
    x = torch.cat([b1, _chain(sd, b, ("branch7x7_1", "branch7x7_2", "branch7x7_3"), x),
                   _chain(sd, b, [f"branch7x7dbl_{i}" for i in range(1, 6)], x),
                   _basic(sd, f"{b}.branch_pool", _avg(x))], 1)
  x = torch.cat([_chain(sd, "Mixed_7a", ("branch3x3_1", "branch3x3_2"), x),
                 _chain(sd, "Mixed_7a", [f"branch7x7x3_{i}" for i in range(1, 5)], x),
                 F.max_pool2d(x, 3, 2)], 1)
  for b, pool in (("Mixed_7b", _avg), ("Mixed_7c", lambda t: F.max_pool2d(t, 3, 1, 1))):
    b3 = _basic(sd, f"{b}.branch3x3_1", x)
    bd = _chain(sd, b, ("branch3x3dbl_1", "branch3x3dbl_2"), x)
    x = torch.cat([_basic(sd, f"{b}.branch1x1", x),
                   _basic(sd, f"{b}.branch3x3_2a", b3), _basic(sd, f"{b}.branch3x3_2b", b3),
                   _basic(sd, f"{b}.branch3x3dbl_3a", bd), _basic(sd, f"{b}.branch3x3dbl_3b", bd),
                   _basic(sd, f"{b}.branch_pool", pool(x))], 1)
  pool = x.mean(dim=(2, 3))
  return dict(pool=pool.numpy(), spatial=spatial.numpy(), logits=(pool @ sd["fc.weight"].T).numpy())


def _tf1_resize(x, size):
  """TF1 ResizeBilinear (align_corners=False, no half-pixel): 4-tap gather per output pixel."""
  def axis(n):
    src = np.arange(size, dtype=np.float32) * np.float32(n / size)
    lo = np.floor(src).astype(int)
    return lo, np.minimum(lo + 1, n - 1), (src - lo)
  y0, y1, fy = axis(x.shape[1])
  x0, x1, fx = axis(x.shape[2])
  wx, wy = fx[None, None, :, None], fy[None, :, None, None]
  top = x[:, y0][:, :, x0] * (1 - wx) + x[:, y0][:, :, x1] * wx
  bot = x[:, y1][:, :, x0] * (1 - wx) + x[:, y1][:, :, x1] * wx
  return top * (1 - wy) + bot * wy


# ------------------------------------------------------------------ tests
def test_architecture_table_has_the_known_472_tensors():
  sd = make_state_dict(with_counters=False)
  assert len(CONVS) == 94 and len(sd) == 472
  assert sum(v.numel() for v in sd.values()) == 23_885_392  # Incl. BN statistics.


def test_converter_covers_every_key_both_ways_via_a_pth_file(tmp_path):
  sd = make_state_dict()
  path = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
  torch.save(sd, path)
  variables = inception_fid.convert(inception_fid.load_state_dict(path))
  template = inception.variables_template()
  shapes = jax.tree.map(lambda a: a.shape, template)
  assert jax.tree.map(np.shape, variables) == shapes
  # Spot-check the transposes against the source tensors.
  w = sd["Mixed_6d.branch7x7_2.conv.weight"].numpy()  # (O, I, 1, 7)
  got = variables["params"]["Mixed_6d"]["branch7x7_2"]["conv"]["kernel"]  # (1, 7, I, O)
  np.testing.assert_array_equal(got[0, 3, 5, 9], w[9, 5, 0, 3])
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], sd["fc.weight"].numpy().T)
  np.testing.assert_array_equal(variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"],
                                sd["Conv2d_1a_3x3.bn.running_var"].numpy())
  # Converted once by the CLI, saved, loaded: identical.
  inception_fid.main(["--src", path, "--out", str(tmp_path / "w.npz")])
  jax.tree.map(np.testing.assert_array_equal, inception_fid.load(str(tmp_path / "w.npz")),
               variables)


def test_converter_names_missing_unexpected_and_misshapen_keys():
  sd = make_state_dict(with_counters=False)
  del sd["Mixed_7c.branch_pool.bn.running_var"]
  sd["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
  sd["Mixed_5b.branch5x5_2.conv.weight"] = torch.zeros(64, 48, 3, 3)
  with pytest.raises(ValueError) as err:
    inception_fid.convert(sd)
  msg = str(err.value)
  assert "3 problem(s)" in msg, msg
  assert "missing source tensor 'Mixed_7c.branch_pool.bn.running_var'" in msg
  assert "unexpected source tensor 'AuxLogits.fc.weight'" in msg
  assert "'Mixed_5b.branch5x5_2.conv.weight': shape (64, 48, 3, 3)" in msg


def test_resize_matrices_match_tf1_and_torch_bilinear():
  x = np.random.default_rng(0).uniform(0, 255, (1, 13, 21, 3))
  got = np.asarray(inception.preprocess(jnp.asarray(x, jnp.float32), "adm"))
  np.testing.assert_allclose(got, (_tf1_resize(x, 299) - 128) / 128, atol=2e-5)
  want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float(), size=(299, 299),
                       mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
  got = np.asarray(inception.preprocess(jnp.asarray(x, jnp.float32), "pytorch_fid"))
  np.testing.assert_allclose(got, want / 127.5 - 1, atol=2e-5)
  # Downsampling (a 512 image) follows the same 2-tap rule; grayscale is tiled to RGB.
  big = np.random.default_rng(1).uniform(0, 255, (1, 512, 400, 1))
  got = np.asarray(inception.preprocess(jnp.asarray(big, jnp.float32), "adm"))
  np.testing.assert_allclose(got, (_tf1_resize(np.repeat(big, 3, -1), 299) - 128) / 128,
                             atol=2e-5)


def test_forward_matches_the_torch_reference_at_299():
  sd = make_state_dict(seed=1)
  variables = inception_fid.convert(sd)
  # A small non-square input: the resize to 299 is part of the network.
  images = np.random.default_rng(2).integers(0, 256, (2, 37, 45, 3), np.uint8)
  got = jax.jit(inception.InceptionV3().apply)(variables, images)
  with torch.no_grad():
    want = reference_forward(sd, images)
  assert {k: v.shape for k, v in got.items()} == {"pool": (2, 2048), "spatial": (2, 2023),
                                                  "logits": (2, 1008)}
  for k in ("pool", "spatial", "logits"):
    w, g = want[k], np.asarray(got[k])
    assert np.isfinite(w).all() and w.std() > 1e-2, (k, w.std())  # Non-degenerate features.
    # Measured: max error 2e-6 of the largest value; a pooling mistake gives 5e-2 or more.
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=k)
  # The two images differ, so do their features.
  assert np.abs(want["pool"][0] - want["pool"][1]).max() > 1e-2


# ------------------------------------------------------------------ --mode=eval end to end
def test_eval_mode_samples_scores_resumes_and_scores_a_set_against_itself(tmp_path):
  c = tiny_config()
  workdir = str(tmp_path / "run")
  # An untrained step-0 checkpoint: eval only needs weights, and this skips compiling the
  # train step (the slowest part of this test otherwise).
  model, tx = models.from_config(c), state_lib.make_optimizer(c.train)
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), async_save=False)
  checkpoint.save(mngr, 0, state_lib.fresh_state(model, tx, c.seed),
                  None)
  mngr.wait_until_finished()
  mngr.close()
  weights = str(tmp_path / "inception.npz")
  inception_fid.save(inception_fid.convert(make_state_dict(seed=3)), weights)
  ref_dir = tmp_path / "reference"  # A folder of RGB PNGs; the samples are grayscale.
  ref_dir.mkdir()
  rng = np.random.default_rng(4)
  for i in range(8):
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), np.uint8)).save(ref_dir / f"{i}.png")
  # 2048-d FID needs thousands of samples and a minute of sqrtm on 2 cores: left to
  # tests/test_metrics.py; here the pipeline and the metrics that are exact on 8 images.
  metrics = "is,precision,recall"
  cmd = [sys.executable, "-m", "sgjax.main", "--config=tests/configs/tiny.py",
         f"--workdir={workdir}", "--mode=eval",
         "--config.eval.num_samples=8", "--config.eval.batch_size=8",
         f"--config.eval.metrics=({','.join(repr(m) for m in metrics.split(','))})",
         f"--config.eval.inception_weights={weights}", f"--config.eval.reference={ref_dir}"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  first = json.load(open(os.path.join(workdir, "metrics.json")))
  assert first["num_samples"] == 8 and first["rule"] == "sg" and first["step"] == 0
  assert 1.0 <= first["inception_score"] <= 8.0  # At most the number of samples.
  assert 0.0 <= first["precision"] <= 1.0 and 0.0 <= first["recall"] <= 1.0
  # The scores are TensorBoard scalars at the checkpoint's step, beside the train curves.
  scalars = builders.summaries(os.path.join(workdir, "tensorboard"))
  assert [(step, v.simple_value) for step, v in scalars["eval/sg/inception_score"]] == [
      (0, pytest.approx(first["inception_score"], rel=1e-6))]
  assert "eval/sg/precision" in scalars and "eval/sg/rule" not in scalars
  samples_npz = first["samples"] + ".npz"
  images = np.load(samples_npz)["arr_0"]
  assert images.shape == (8, 16, 16, 1) and images.dtype == np.uint8
  shards = sorted(s for s in os.listdir(first["samples"]) if s.startswith("shard_"))
  assert shards == ["shard_00000.npz"]
  mtimes = [os.path.getmtime(os.path.join(first["samples"], s)) for s in shards]

  # Again, scored against its own samples: nothing is resampled, and a set is exactly on its
  # own manifold (precision = recall = 1) with the same IS.
  c.eval.update(num_samples=8, batch_size=8, metrics=tuple(metrics.split(",")),
                inception_weights=weights, reference=samples_npz)
  again = eval_job.run(c, workdir)
  assert again["samples"] == first["samples"]
  assert [os.path.getmtime(os.path.join(first["samples"], s)) for s in shards] == mtimes
  assert (again["precision"], again["recall"]) == (1.0, 1.0)
  assert again["inception_score"] == pytest.approx(first["inception_score"], rel=1e-6)


def test_reference_statistics_of_an_adm_batch_are_read_not_recomputed(tmp_path):
  rng = np.random.default_rng(5)
  pool, spatial = inception.POOL_DIM, inception.SPATIAL_DIM  # Checked: the FID Inception's sizes.
  stats = dict(mu=rng.normal(size=pool), sigma=np.eye(pool, dtype=np.float32),
               mu_s=rng.normal(size=spatial), sigma_s=np.eye(spatial, dtype=np.float32))
  path = str(tmp_path / "VIRTUAL_ref.npz")
  np.savez(path, **stats)  # No arr_0: FID/sFID work, precision/recall cannot.
  weights = str(tmp_path / "w.npz")
  open(weights, "w").close()
  e = ConfigDict(dict(reference=path, inception_weights=weights, preprocess="adm",
                      metrics=("fid", "sfid"), batch_size=8))
  got = eval_job.reference_statistics(e, None, None, str(tmp_path / "cache"))
  assert sorted(got) == sorted(stats)
  for k, v in stats.items():
    np.testing.assert_array_equal(got[k], v)
  e.metrics = ("fid", "precision")
  with pytest.raises(ValueError, match=r"eval.reference = .* no 'arr_0' images"):
    eval_job.reference_statistics(e, None, None, str(tmp_path / "cache2"))
