"""Text features: the real MiniLM encoder's behaviour, and the caption dataset written by the
tool and read by the train pipeline as {"image", "text", "text_mask"} with the right rows."""

import json
import os

import numpy as np
import pytest

from sgjax import condition, validation
from sgjax.data import captions, pipeline
from sgjax.text import encoder as encoder_lib
from tests.builders import load_config


@pytest.fixture(scope="module")
def minilm():
  return encoder_lib.get("minilm")


def _pooled(enc, texts):
  f, m = enc.encode(texts, 16)
  p = (f * m[..., None]).sum(1) / m.sum(1, keepdims=True)
  return p / np.linalg.norm(p, axis=1, keepdims=True)


def test_minilm_features_mask_and_meaning(minilm):
  f, m = minilm.encode(["a photo of a sneaker", "", "word " * 40], 12)
  assert f.shape == (3, 12, 384) and f.dtype == np.float32 and m.dtype == bool
  # [CLS] a photo of a sneak ##er [SEP] = 8 tokens; "" = [CLS] [SEP]; long text cut to 12.
  assert m.sum(1).tolist() == [8, 2, 12]
  assert np.all(m[:, :2]) and not np.any(m[0, 8:])
  assert np.all(f[~m] == 0) and np.all(np.abs(f[m]).sum(-1) > 1)
  p = _pooled(minilm, ["a photo of a sneaker", "a picture of a sneaker", "a photo of a dress",
                       "an ankle boot, product shot", "a boot for the ankle, shop image"])
  sim = p @ p.T
  assert sim[0, 1] > sim[0, 2] + 0.2  # A paraphrase is closer than another class.
  assert sim[3, 4] > max(sim[3, 0], sim[3, 2])


class _HashEncoder:
  """Deterministic stand-in (the real one is tested above): token i of a text is a vector
  seeded by (text, i); L_i = words + 2, like [CLS] … [SEP]."""
  name, width = "minilm", 8

  def encode(self, texts, max_tokens):
    per = [np.stack([np.random.default_rng([len(t), sum(map(ord, t)), i]).normal(size=8)
                     for i in range(len(t.split()) + 2)]) for t in texts]
    return encoder_lib.pad_features(per, max_tokens, 8)


def test_caption_dataset_roundtrip(tmp_path):
  c = load_config("fashion_mnist_t2i")
  c.data.cache_dir = str(tmp_path)
  c.text.width = 8
  validation.validate(c)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 28, 28, 1), np.uint8)
  labels = (np.arange(40) % 10).astype(np.int32)
  captions.write(c, _HashEncoder(), images, labels, log=lambda m: None)
  table = captions.captions(c.text.templates)
  assert captions.caption(9, "{}, product shot") == "An ankle boot, product shot"
  src = pipeline.data_source(c.data, "train")
  enc = _HashEncoder()
  for i in (0, 13, 39):
    r = src[i]
    np.testing.assert_array_equal(r["image"], images[i])
    # The record's text is the features of one training caption of its own class.
    feats, mask = enc.encode(captions.captions(c.text.templates), c.text.max_tokens)
    cid = [k for k in range(len(feats)) if np.array_equal(feats[k], r["text"])]
    assert len(cid) == 1 and cid[0] // len(c.text.templates) == labels[i]
    np.testing.assert_array_equal(r["text_mask"], mask[cid[0]])
  it = pipeline.make_train_iterator(c.data, 8, seed=0)
  batch = next(it)
  assert batch["text"].shape == (8, 16, 8) and batch["text_mask"].dtype == bool
  assert set(condition.from_batch(batch)) == {"text", "text_mask"}
  null = captions.null_condition(c)
  np.testing.assert_array_equal(null["text_mask"], np.arange(16) < 2)  # "" = [CLS] [SEP].
  prompts = captions.eval_prompts(c)
  assert len(prompts["label"]) == 10 * len(c.text.eval_templates)
  assert not set(prompts["caption"]) & set(table)  # Held-out wording is never trained on.
  # A dataset written for other text settings is refused, naming the field.
  c.text.max_tokens = 20
  with pytest.raises(ValueError, match="text.max_tokens = 20"):
    captions.null_condition(c)
  with open(os.path.join(captions.dataset_dir(str(tmp_path)), captions.METADATA)) as f:
    assert json.load(f)["num_records"] == 40
