"""The tiny latent setup of tests/test_encode_latents.py, also a config file for subprocess runs.

Kept free of torch (tests/test_vae.py imports it): the encode CLI subprocess loads this file.
"""

from tests.test_train import tiny_config

CROP = 32  # The tiny VAE (channels (8, 16), 1 latent channel) downsamples x2: 16x16x1 latents.
VAE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=1, in_channels=3,
           norm_groups=4)


def latent_config(image_dir="", data_dir="", weights=""):
  """tiny_config on encoded latents: 16x16x1 in 4 classes, so the DiT, its train step and its
  sampler are exactly tiny_config's and share compiled programs with tests/test_train.py and
  test_loop.py through the test run's compilation cache."""
  c = tiny_config()
  c.data.update(name="latents", dir=data_dir, image_size=CROP // 2, channels=1, num_classes=4)
  c.vae.update(VAE, weights=weights, chunk=4)
  c.encode.update(source="folder", source_dir=image_dir, image_size=CROP, flip=True,
                  batch_size=4, shard_size=3)  # 8 images -> shards of 3, 3, 2 (last is short).
  c.train.update(num_steps=2)
  return c


def get_config():
  return latent_config()
