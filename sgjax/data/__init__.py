"""Input data: raw readers, our tfds ArrayRecord builders, and grain pipelines."""
