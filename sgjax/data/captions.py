"""Fashion-MNIST with captions, the text-to-image demo data (`data.name=fashion_mnist_captions`).

Captions are made from the class names with templates ("a photo of {}", "{}, product shot", …);
`text.templates` are for training, `text.eval_templates` (wording never seen in training) for
evaluation. `python -m sgjax.tools.encode_text` runs the frozen encoder once and writes, into
`<data.cache_dir>/fashion_mnist_captions/`:

  train.array_record   one record per training image: image (28·28 uint8) | label | caption id
  text_features.npz    the features of the few distinct captions (a table indexed by caption id),
                       of the held-out evaluation prompts, and of the empty prompt (CFG's ∅)
  metadata.json        what was encoded (encoder, max_tokens, templates), checked on read

A caption id per image plus one table (10 classes × templates rows) instead of features per image:
60,000 × 16 × 384 float32 would be 1.5 GB, the table is 2 MB. The source joins them, so training
sees records {"image", "label", "text", "text_mask"} and never runs the encoder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from sgjax import errors, readers
from sgjax.data import fashion_mnist

NAME = "fashion_mnist_captions"
FEATURES, METADATA, RECORDS = "text_features.npz", "metadata.json", "train.array_record"
# Each Fashion-MNIST class as a noun phrase with its article (index = label).
CLASS_PHRASES = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
                 "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot")
_IMAGE_BYTES = 28 * 28


def check_config(config: ml_collections.ConfigDict) -> None:
  """The caption templates of `text` (training's and the held-out evaluation ones)."""
  tx = config.text
  for name in ("templates", "eval_templates"):
    errors.check(len(tx[name]) > 0 and all("{}" in t for t in tx[name]), f"text.{name}",
                 tx[name], "must be a non-empty tuple of strings, each with one {} for the class")


def caption(label: int, template: str) -> str:
  """`template` with the class's noun phrase; a template starting with {} is capitalised."""
  text = template.format(CLASS_PHRASES[label])
  return text[0].upper() + text[1:] if template.startswith("{}") else text


def captions(templates: Sequence[str]) -> list[str]:
  """All captions, class-major: id = label · len(templates) + template index."""
  return [caption(k, t) for k in range(len(CLASS_PHRASES)) for t in templates]


def dataset_dir(cache_root: str) -> str:
  return os.path.join(cache_root, NAME)


def metadata(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the written dataset must agree with (compared on read)."""
  tx = config.text
  return dict(format="sgjax-captions-v1", encoder=tx.encoder, width=int(tx.width),
              max_tokens=int(tx.max_tokens), templates=list(tx.templates),
              eval_templates=list(tx.eval_templates), seed=int(config.seed))


def pack(image: np.ndarray, label: int, caption_id: int) -> bytes:
  return np.asarray(image, np.uint8).tobytes() + np.array([label, caption_id], np.int32).tobytes()


def unpack(record: bytes) -> tuple[np.ndarray, int, int]:
  image = np.frombuffer(record, np.uint8, _IMAGE_BYTES).reshape(28, 28, 1)
  label, caption_id = np.frombuffer(record, np.int32, 2, _IMAGE_BYTES)
  return image, int(label), int(caption_id)


def _cache_root(config: ml_collections.ConfigDict) -> str:
  return config.data.cache_dir or fashion_mnist.DEFAULT_CACHE


def check_written(config: ml_collections.ConfigDict) -> str:
  """The dataset folder, after checking it was written for this config's text fields."""
  directory = dataset_dir(_cache_root(config))
  path = os.path.join(directory, METADATA)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: write the text features first with "
                            "`python -m sgjax.tools.encode_text --config=<this config>`")
  written = readers.json_object(path, "caption set's metadata", "rerun `python -m "
                                "sgjax.tools.encode_text --config=<this config>`")
  want = metadata(config)
  for k in want:
    if written.get(k) != want[k]:
      raise errors.UserError(f"text.{k} = {want[k]!r}, but {directory} was written with "
                             f"{written.get(k)!r}", "rerun `python -m sgjax.tools.encode_text`")
  return directory


def load_features(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  with np.load(os.path.join(check_written(config), FEATURES)) as f:
    return {k: f[k] for k in f.files}


def null_condition(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The empty prompt's features, {"text": (L, D), "text_mask": (L,)}: CFG's ∅."""
  f = load_features(config)
  return {"text": f["null_text"], "text_mask": f["null_mask"]}


def eval_prompts(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Held-out prompts (class-major): {"text", "text_mask", "label", "caption"}."""
  f = load_features(config)
  return {"text": f["eval_text"], "text_mask": f["eval_mask"], "label": f["eval_label"],
          "caption": f["eval_caption"]}


class CaptionSource:
  """Random-access records {"image", "label", "text", "text_mask"} (grain source)."""

  def __init__(self, directory: str):
    self._records = grain.sources.ArrayRecordDataSource([os.path.join(directory, RECORDS)])
    with np.load(os.path.join(directory, FEATURES)) as f:
      self._text, self._mask = f["train_text"], f["train_mask"]

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    image, label, cid = unpack(self._records[index])
    return {"image": image, "label": label, "text": self._text[cid],
            "text_mask": self._mask[cid]}


def source(cache_root: str, split: str) -> CaptionSource:
  if split != "train":
    raise errors.UserError(f"split {split!r}", f"{NAME} holds the train split only "
                           "(evaluation uses held-out prompts, sgjax.data.captions.eval_prompts)")
  directory = dataset_dir(cache_root)
  if not os.path.exists(os.path.join(directory, RECORDS)):
    raise FileNotFoundError(f"{directory}/{RECORDS} not found: write it first with "
                            "`python -m sgjax.tools.encode_text --config=<this config>`")
  return CaptionSource(directory)


def write(config: ml_collections.ConfigDict, encoder, images: np.ndarray, labels: np.ndarray,
          log=print) -> str:
  """Encodes every caption once and writes the dataset folder; returns its path.

  Each image gets one training template, drawn with `config.seed`. Files are written under
  temporary names and renamed, metadata last, so a killed run never leaves a folder that looks
  complete.
  """
  from array_record.python.array_record_module import ArrayRecordWriter

  tx = config.text
  if encoder.width != tx.width:
    raise errors.UserError(f"text.width = {tx.width}",
                           f"the {tx.encoder} encoder's features are {encoder.width} wide")
  directory = dataset_dir(_cache_root(config))
  os.makedirs(directory, exist_ok=True)
  train_caps = captions(tx.templates)
  eval_caps = captions(tx.eval_templates)
  log(f"encoding {len(train_caps)} training captions, {len(eval_caps)} held-out prompts and the "
      f"empty prompt with {tx.encoder} (max {tx.max_tokens} tokens)")
  feats, mask = encoder.encode(train_caps + eval_caps + [""], tx.max_tokens)
  n_train, n_eval = len(train_caps), len(eval_caps)
  tmp = os.path.join(directory, "features.tmp.npz")
  np.savez(tmp, train_text=feats[:n_train], train_mask=mask[:n_train],
           train_caption=np.array(train_caps),
           eval_text=feats[n_train:n_train + n_eval], eval_mask=mask[n_train:n_train + n_eval],
           eval_label=np.repeat(np.arange(len(CLASS_PHRASES), dtype=np.int32),
                                len(tx.eval_templates)),
           eval_caption=np.array(eval_caps), null_text=feats[-1], null_mask=mask[-1])
  os.replace(tmp, os.path.join(directory, FEATURES))

  rng = np.random.default_rng(config.seed)
  template = rng.integers(0, len(tx.templates), len(images))
  ids = labels.astype(np.int64) * len(tx.templates) + template
  tmp = os.path.join(directory, RECORDS + ".tmp")
  writer = ArrayRecordWriter(tmp, "group_size:1")  # One record per chunk: fast random reads.
  for image, label, cid in zip(images, labels, ids, strict=True):
    writer.write(pack(image, int(label), int(cid)))
  writer.close()
  os.replace(tmp, os.path.join(directory, RECORDS))
  with open(os.path.join(directory, METADATA + ".tmp"), "w") as f:
    json.dump(dict(metadata(config), num_records=len(images)), f, indent=1)
  os.replace(os.path.join(directory, METADATA + ".tmp"), os.path.join(directory, METADATA))
  log(f"wrote {len(images)} records and the feature table to {directory}")
  return directory
