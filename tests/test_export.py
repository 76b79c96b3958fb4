"""sgjax-export (issue 24 items 3, 4): a workdir's EMA weights as safetensors in our layout or the
official DiT/SiT one; export -> import is bit-exact for each layout, an imported official
checkpoint goes back out key by key, the files need nothing but the `safetensors` package, and
a layout that cannot hold the model is refused with one line."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import sgjax
from sgjax import errors, export, sharding, state
from sgjax import workdir as workdir_lib
from sgjax.convert import dit_checkpoint as ckpt
from sgjax.jobs import export as export_job
from sgjax.text import encoder as encoder_lib
from tests.builders import (
  WordEncoder,
  official_dit_state_dict,
  tiny_config,
  tiny_t2i_config,
  write_checkpoints,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SG = dict(rule="sg", omega=3.0, gamma=(0.0, 0.5), steps=3, seed=0)


def _trained(workdir, config):
  write_checkpoints(config, workdir, [2, 4])
  workdir_lib.write(workdir, config, base_step=-1, written_by="test")
  return workdir


def _ema(config, workdir):
  mesh = sharding.build_mesh(config.mesh)
  with jax.set_mesh(mesh):
    _, params, _ = state.restore_params(config, workdir, mesh)
  return jax.tree.map(np.asarray, jax.device_get(params))


def _equal_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
  """A routed (TREAD) velocity model of tiny_config, time_scale 1000, trained to step 4."""
  root = tmp_path_factory.mktemp("export")
  return _trained(str(root / "run"), tiny_config()), root


def test_sgjax_and_sit_layouts_round_trip_bit_exact(routed):
  workdir, root = routed
  config = tiny_config()
  ema = _ema(config, workdir)

  ours = str(root / "ours.safetensors")
  export_job.run(workdir, "sgjax", ours)
  _equal_trees(export.unflatten(load_file(ours)), ema)
  pipe = sgjax.load(ours)  # Opened directly: config and step from the file.
  assert pipe.step == 4 and pipe.source == ours
  _equal_trees(jax.tree.map(np.asarray, jax.device_get(pipe.params)), ema)
  np.testing.assert_array_equal(pipe(labels=[0, 3], **SG), sgjax.load(workdir)(labels=[0, 3],
                                                                              **SG))
  with pytest.raises(errors.UserError, match=r"^--out=.*ours.safetensors: exists; export to a "
                                             "new file"):
    export_job.run(workdir, "sgjax", ours)

  sit = str(root / "sit.safetensors")
  tensors = export_job.run(workdir, "sit", sit)
  sd = load_file(sit)
  assert sorted(sd) == sorted(tensors) and "blocks.2.attn.qkv.weight" in sd
  assert sd["x_embedder.proj.weight"].shape == (64, 1, 4, 4)  # torch Conv2d (out, in, kh, kw).
  assert sd["blocks.0.mlp.fc1.weight"].shape == (256, 64)  # torch Linear (out, in).
  assert sd["y_embedder.embedding_table.weight"].shape == (5, 64)  # 4 classes + the null row.
  # learn_sigma: 2 channels per pixel of the 1-channel model, the variance one zero.
  linear = sd["final_layer.linear.weight"].reshape(16, 2, 64)
  assert linear.shape == (16, 2, 64) and not linear[:, 1].any() and linear[:, 0].any()
  # The converter reads it back to our params, bit for bit (routes are not weights).
  params, arch = ckpt.convert(sd, heads=4)
  _equal_trees(jax.tree.map(np.asarray, params), ema)
  assert (arch["depth"], arch["num_classes"], arch["learn_sigma"]) == (3, 4, True)
  with safe_open(sit, "np") as f:
    meta = f.metadata()
  assert (meta["format"], meta["sgjax.layout"], meta["prediction"], meta["time_scale"]) == (
      "pt", "sit", "velocity", "1000.0")
  assert json.loads(meta["architecture"])["heads"] == 4
  assert json.loads(meta["sgjax.config"])["sparsity.routes"] == [[1, 1, 0.5]]

  # A velocity network is no DiT (DiT's sampler reads ε): refused before anything is written.
  dit = str(root / "dit.safetensors")
  with pytest.raises(errors.UserError) as err:
    export_job.run(workdir, "dit", dit)
  assert str(err.value) == ("--layout=dit: model.prediction = 'velocity', but DIT's sampler "
                            "reads the network's output as 'eps_vp'; export this model with "
                            "--layout=sit or sgjax")
  assert not os.path.exists(dit)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_an_imported_official_checkpoint_goes_back_out_key_by_key(tmp_path, learn_sigma):
  original = official_dit_state_dict(learn_sigma=learn_sigma)
  params, arch = ckpt.convert(original, heads=4)
  workdir = str(tmp_path / "imported")
  ckpt.write_workdir(params, arch, "dit", workdir)
  out = str(tmp_path / "dit.safetensors")
  export_job.run(workdir, "dit", out, learn_sigma=learn_sigma)
  back = load_file(out)
  assert sorted(back) == sorted(original)
  for key, value in original.items():
    if learn_sigma and key.startswith("final_layer.linear."):
      # The variance half is not imported (an ODE sampler never reads it): zero on the way out.
      rows = np.arange(len(value)) % 8 < 4  # 4 channels per pixel, then 4 of variance.
      np.testing.assert_array_equal(back[key][rows], value[rows])
      assert not back[key][~rows].any()
    else:
      assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
      np.testing.assert_array_equal(back[key], value, err_msg=key)
  # The converter imports the exported file itself (it reads safetensors): the same params.
  again, _ = ckpt.convert(ckpt.load_state_dict(out), heads=4)
  _equal_trees(jax.tree.map(np.asarray, again), jax.tree.map(np.asarray, params))
  with pytest.raises(errors.UserError, match=r"^--layout=sit: model.prediction = 'eps_vp'"):
    export_job.run(workdir, "sit", str(tmp_path / "sit.safetensors"))


def test_layouts_that_cannot_hold_the_model_are_refused():
  masked = tiny_config()
  masked.sparsity.update(routes=(), mask_gamma=0.5)
  masked.model.update(decoder_depth=1, decoder_width=32, decoder_heads=2)
  text = tiny_t2i_config()
  for config, layout, message in [
      (text, "dit", "--layout=dit: model.kind = 'trdit' is not a class-conditional DiT/SiT"),
      (text, "sit", "--layout=sit: model.kind = 'trdit' is not a class-conditional DiT/SiT"),
      (masked, "sit", "--layout=sit: model.decoder_depth = 1: a masked model's decoder has no "
                      "place in the official SIT state dict; --layout=sgjax keeps every model"),
      (tiny_config(), "pt", "--layout = 'pt': allowed: sit, dit, sgjax")]:
    with pytest.raises(errors.UserError) as err:
      export.check_layout(config, layout)
    assert str(err.value).startswith(message), str(err.value)
  for config in (masked, text):
    export.check_layout(config, "sgjax")  # Our layout holds every model.
  with pytest.raises(errors.UserError, match=r"^--out=w.pt: not a .safetensors path"):
    export.check_out("w.pt")


def test_a_text_model_exports_as_sgjax_and_samples_prompts_from_the_file(tmp_path, monkeypatch):
  monkeypatch.setitem(encoder_lib.ENCODERS, "words", WordEncoder)
  config = tiny_t2i_config()
  config.text.encoder = "words"
  workdir = _trained(str(tmp_path / "t2i"), config)
  with pytest.raises(errors.UserError, match="model.kind = 'trdit'"):
    export_job.run(workdir, "dit", str(tmp_path / "dit.safetensors"))
  out = str(tmp_path / "t2i.safetensors")
  export_job.run(workdir, "sgjax", out)
  pipe = sgjax.load(out)
  assert pipe.text
  prompts = ["a bag", "an ankle boot"]
  images = pipe(prompts=prompts, rule="cfg", omega=2.0, steps=2)
  assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 1) and images.std() > 0
  np.testing.assert_array_equal(images, sgjax.load(workdir)(prompts=prompts, rule="cfg",
                                                            omega=2.0, steps=2))
  with pytest.raises(errors.UserError, match="^prompts: a text model samples prompts"):
    pipe(labels=[1])


def test_the_file_needs_only_safetensors_and_the_command_writes_it(routed):
  workdir, root = routed
  out = str(root / "cli.safetensors")
  env = dict(os.environ, PYTHONPATH=ROOT)
  done = subprocess.run([sys.executable, "-m", "sgjax.jobs.export", f"--workdir={workdir}",
                         "--layout=sit", f"--out={out}"], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)
  assert done.returncode == 0, done.stderr
  assert f"{out}: sit layout, 42 tensors" in done.stdout
  # A plain interpreter: safetensors' numpy and torch readers, nothing of sgjax or jax.
  script = (
      "import sys\n"
      "from safetensors import safe_open\n"
      "from safetensors.numpy import load_file\n"
      f"sd = load_file({out!r})\n"
      f"meta = safe_open({out!r}, 'np').metadata()\n"
      "assert not [m for m in sys.modules if m.split('.')[0] in ('sgjax', 'jax', 'flax')]\n"
      "from safetensors.torch import load_file as torch_load\n"
      f"t = torch_load({out!r})\n"
      "assert all((t[k].numpy() == v).all() for k, v in sd.items())\n"
      "print(len(sd), meta['sgjax.layout'], tuple(t['blocks.0.attn.qkv.weight'].shape))\n")
  plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=str(root), timeout=120)
  assert plain.returncode == 0, plain.stderr
  assert plain.stdout.split() == ["42", "sit", "(192,", "64)"]
