"""The tiny synthetic-data config of the tests, as a config file for subprocess runs."""

from tests.builders import tiny_config


def get_config():
  return tiny_config()
