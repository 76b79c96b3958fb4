"""The tiny latent setup of the tests (tests/builders.py) as a config file for subprocess runs."""

from tests.builders import latent_config


def get_config():
  return latent_config()
