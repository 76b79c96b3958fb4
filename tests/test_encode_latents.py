"""The latent stages end to end on a tiny generated image folder: ADM center crop, the encode tool
(CLI, sharded, resumable, byte-identical on resume), the grain pipeline over its output, a
couple of train steps on it and sampling that decodes to pixels with the same VAE."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sgjax import train, validation
from sgjax.convert import sd_vae
from sgjax.data import latents, pipeline
from sgjax.jobs import sample as sample_job
from sgjax.models import vae
from sgjax.tools import encode_latents
from tests.builders import CROP, VAE, apply, latent_config, write_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (height, width) per image, class folder by class folder; one PNG among the JPEGs.
SIZES = {"n01": [(80, 64), (64, 96)], "n02": [(40, 40), (128, 72)],
         "n03": [(32, 48), (100, 100)], "n04": [(66, 34), (24, 40)]}  # The last is upscaled.


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("latents")
  rng = np.random.default_rng(0)
  for cls, sizes in SIZES.items():
    os.makedirs(root / "images" / cls)
    for i, (h, w) in enumerate(sizes):
      # Smooth colour ramps plus noise: a JPEG-friendly image whose halves differ (flip matters).
      ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 255, (1, 1, 3))
      pixels = np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
      name = f"img{i}.png" if (cls, i) == ("n03", 1) else f"img{i}.JPEG"
      Image.fromarray(pixels).save(root / "images" / cls / name)
  (root / "images" / "n01" / "notes.txt").write_text("not an image")  # Ignored.
  weights = write_weights(root / "diffusion_pytorch_model.safetensors", seed=5, **VAE)
  return root, str(root / "images"), weights


@pytest.fixture(scope="module")
def encoded(inputs):
  root, images, weights = inputs
  c = latent_config(images, str(root / "encoded"), weights)
  encode_latents.encode(c)
  return c


def test_center_crop_matches_block_image():
  # 4x4 blocks of random colours, 64x96: two BOX halvings give the block colours exactly, the
  # short side is then 16 (no resize), and the crop is the middle 16 of the 24 columns.
  blocks = np.random.default_rng(1).integers(0, 256, (16, 24, 3), np.uint8)
  image = Image.fromarray(np.repeat(np.repeat(blocks, 4, 0), 4, 1))
  np.testing.assert_array_equal(encode_latents.center_crop(image, 16), blocks[:, 4:20])
  # Upscaling (short side 10 -> 16, BICUBIC) and odd sizes still give a centred square.
  flat = Image.fromarray(np.full((10, 23, 3), 77, np.uint8))
  np.testing.assert_array_equal(encode_latents.center_crop(flat, 16), np.full((16, 16, 3), 77))
  tall = Image.fromarray(np.random.default_rng(2).integers(0, 256, (71, 33, 3), np.uint8))
  assert encode_latents.center_crop(tall, 16).shape == (16, 16, 3)


def _shard_bytes(directory):
  return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))}


def test_encode_cli_resumes_to_the_uninterrupted_result(inputs, encoded, tmp_path, capsys):
  root, images, weights = inputs
  out = tmp_path / "resumed"
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, "-m", "sgjax.tools.encode_latents",
         "--config=tests/configs/tiny_latents.py", f"--config.encode.source_dir={images}",
         f"--config.data.dir={out}", f"--config.vae.weights={weights}",
         "--config.encode.max_shards=1"]
  run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "[3/8" in run.stderr and "1 of 3 shards" in run.stdout  # Progress, and what is left.
  assert sorted(os.listdir(out)) == ["latents-00000-of-00003.array_record", "metadata.json"]

  # Resume in-process; then lose a middle shard (as a kill would) and resume again.
  c = latent_config(images, str(out), weights)
  encode_latents.encode(c)
  assert "resuming: 3 of 8 images" in capsys.readouterr().out
  os.remove(out / "latents-00001-of-00003.array_record")
  encode_latents.encode(c)
  assert _shard_bytes(out) == _shard_bytes(encoded.data.dir)

  with c.unlocked():
    c.encode.flip = False
  with pytest.raises(ValueError, match=r"metadata.json was written with other settings \(flip"):
    encode_latents.encode(c)


def test_records_hold_the_scaled_posterior_of_the_cropped_images(inputs, encoded):
  _, images, weights = inputs
  src = latents.LatentSource(encoded.data.dir)
  assert len(src) == 16 and src.metadata["class_names"] == ["n01", "n02", "n03", "n04"]
  vc = encoded.vae
  model, params = vae.from_config(vc), sd_vae.load_params(vc)
  folder = encode_latents.FolderSource(images)
  crops = np.stack([encode_latents.center_crop(folder.load(i)[0], CROP) for i in range(8)])
  both = np.stack([crops, crops[:, :, ::-1]], 1).reshape(16, CROP, CROP, 3)
  mean, logvar = apply(model, params, both / 127.5 - 1.0, vae.AutoencoderKL.encode)
  records = [src[i] for i in range(16)]
  assert [r["label"] for r in records] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
  got_mean = np.stack([r["mean"] for r in records]).astype(np.float32)
  got_std = np.stack([r["std"] for r in records]).astype(np.float32)
  assert got_mean.dtype == np.float32 and records[0]["mean"].dtype == np.float16
  # float16 storage: relative rounding 2^-11.
  np.testing.assert_allclose(got_mean, np.asarray(mean) * vc.scale, rtol=2e-3, atol=1e-4)
  np.testing.assert_allclose(got_std, np.exp(0.5 * np.asarray(logvar)) * vc.scale, rtol=2e-3)
  assert not np.allclose(got_mean[0], got_mean[1], atol=1e-2)  # The mirror image differs.


def test_pipeline_draws_posterior_samples(encoded):
  dc = encoded.data
  a = next(pipeline.make_train_iterator(dc, 8, seed=0))
  b = next(pipeline.make_train_iterator(dc, 8, seed=0))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["image"].shape == (8, 16, 16, 1) and a["image"].dtype == np.float32
  src = latents.LatentSource(dc.dir)
  means = np.stack([src[i]["mean"] for i in range(len(src))]).astype(np.float32)
  stds = np.stack([src[i]["std"] for i in range(len(src))]).astype(np.float32)
  for image, label in zip(a["image"], a["label"], strict=True):
    # The record it was drawn from: the most likely under N(mean, std²).
    nll = (((image - means) / stds) ** 2 + 2 * np.log(stds)).reshape(len(src), -1).sum(1)
    k = int(np.argmin(nll))
    eps = (image - means[k]) / stds[k]  # The ε of mean + std·ε: a real draw, not 0.
    assert src[k]["label"] == label and 0.5 < eps.std() < 1.5 and np.abs(eps).max() < 6

  bad = dc.copy_and_resolve_references()
  bad.image_size = 4
  with pytest.raises(ValueError, match="data.image_size = 4: the latents in .* have 16"):
    pipeline.data_source(bad)
  c = latent_config()
  c.data.image_size = 4
  with pytest.raises(ValueError, match="data.image_size = 4: latents of encode.image_size"):
    validation.validate(c)


def test_train_on_latents_then_sample_decodes_to_pixels(encoded, tmp_path):
  c = encoded.copy_and_resolve_references()
  workdir = str(tmp_path / "run")
  state = train.train(c, workdir)
  assert int(state["step"]) == 2
  png = sample_job.run(c, workdir)
  samples = np.load(os.path.join(workdir, "samples_sg.npz"))["arr_0"]
  assert samples.shape == (8, CROP, CROP, 3) and samples.dtype == np.uint8
  assert np.asarray(Image.open(png)).shape[-1] == 3 and samples.std() > 0

  with c.unlocked():
    c.vae.weights = ""
  with pytest.raises(ValueError, match="vae.weights = '': a model trained on latents"):
    sd_vae.to_pixels(c, None, np.zeros((1, 16, 16, 1), np.float32))
