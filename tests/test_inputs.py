"""User-named files that cannot be read, and hostile ones: one line naming the file, nothing run.

Every case goes through sgjax.readers (the converters, VAE and Inception weights, eval
references, latent sets); the pickle payloads below would create a folder if anything ran them.
"""

import json
import os
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from sgjax import errors, readers
from sgjax.convert import dit_checkpoint as ckpt
from sgjax.convert import inception_fid, sd_vae
from sgjax.data import latents
from sgjax.jobs import evaluate
from tests.builders import official_dit_state_dict, vae_config, write_weights

HEADS = 4  # The builder's width 64: no DiT size, so heads are given.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Payload:
  """Unpickling this calls os.mkdir(marker): code, not weights."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


def _source(tmp_path, name, data: bytes) -> str:
  path = str(tmp_path / name)
  with open(path, "wb") as f:
    f.write(data)
  return path


def _pt_bytes(tmp_path) -> bytes:
  path = str(tmp_path / "whole.pt")
  torch.save({k: torch.from_numpy(v) for k, v in official_dit_state_dict().items()}, path)
  with open(path, "rb") as f:
    return f.read()


def test_unreadable_converter_sources_are_one_line_naming_the_file(tmp_path):
  whole = _pt_bytes(tmp_path)
  os.mkdir(tmp_path / "folder.pt")
  cases = {
      _source(tmp_path, "notes.pt", b"notes: try DiT-XL/2\n"): r"is not a PyTorch file "
      r"\(it begins b'notes: try D'\)",
      _source(tmp_path, "empty.pt", b""): r"is empty \(0 bytes\)",
      _source(tmp_path, "cut.pt", whole[:len(whole) // 2]): r"not a readable PyTorch file "
      r"\(truncated or not a complete archive",
      str(tmp_path / "folder.pt"): "is a folder, not a file",
      str(tmp_path / "absent.pt"): "no such file",
      _source(tmp_path, "list.pt", b""): None,  # Written below: a pickled list, not a dict.
  }
  torch.save([torch.ones(2)], str(tmp_path / "list.pt"))
  cases[str(tmp_path / "list.pt")] = "holds a list, not a dict of tensors"
  for path, what in cases.items():
    with pytest.raises(errors.UserError) as err:
      ckpt.load_state_dict(path)
    assert str(err.value).startswith(f"--src={path}: "), err.value
    assert len(str(err.value).splitlines()) == 1
    assert __import__("re").search(what, str(err.value)), (what, str(err.value))
  # The command: exit 2, one line, no traceback (the IndexError of issue 23 is gone).
  notes = str(tmp_path / "notes.pt")
  run = subprocess.run([sys.executable, "-m", "sgjax.convert.dit_checkpoint", f"--src={notes}",
                        f"--out={tmp_path / 'out'}"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
  lines = [s for s in run.stderr.splitlines() if s.startswith("error:") or "Traceback" in s]
  assert run.returncode == 2 and lines == [
      f"error: --src={notes}: is not a PyTorch file (it begins b'notes: try D'); "
      f"{readers.STATE_DICT_ALLOWED}"], run.stderr
  assert not os.path.exists(tmp_path / "out")


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
  marker, control = str(tmp_path / "ran"), str(tmp_path / "ran_unsafe")
  hostile = str(tmp_path / "hostile.pt")
  torch.save({"pos_embed": torch.zeros(1), "x": _Payload(marker)}, hostile)
  with pytest.raises(errors.UserError, match=r"^--src=.*hostile.pt: not a readable PyTorch file "
                     r"\(its pickle would call posix.mkdir, which is code, not weights; refused "
                     r"before anything in it ran\)"):
    ckpt.load_state_dict(hostile)
  assert not os.path.exists(marker)
  # The payload is real: an unrestricted load of the same bytes does run it.
  torch.save({"x": _Payload(control)}, str(tmp_path / "control.pt"))
  torch.load(str(tmp_path / "control.pt"), weights_only=False)
  assert os.path.isdir(control)
  # The same for the Inception converter's .pth.
  with pytest.raises(errors.UserError, match=r"^--src=.*: not a readable PyTorch file \(its "
                     r"pickle would call posix.mkdir"):
    inception_fid.load_state_dict(hostile, "--src=" + hostile)
  # An .npz whose object array would run the payload when unpickled.
  npz = str(tmp_path / "hostile.npz")
  np.savez(npz, arr_0=np.array([_Payload(marker)], dtype=object))
  for call in (lambda: readers.npz(npz), lambda: evaluate.check_reference(npz, True),
               lambda: inception_fid.load_variables(npz)):
    with pytest.raises(errors.UserError, match=r"array 'arr_0' holds Python objects \(a pickle, "
                       r"which could run code; refused unread\)"):
      call()
  assert not os.path.exists(marker)


def _safetensors_with_header(tmp_path, name, header: bytes, data: bytes = b"") -> str:
  return _source(tmp_path, name, struct.pack("<Q", len(header)) + header + data)


def test_a_corrupt_safetensors_header_is_refused(tmp_path):
  good = str(tmp_path / "good.safetensors")
  save_numpy({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, good)
  with open(good, "rb") as f:
    raw = f.read()
  (n,) = struct.unpack("<Q", raw[:8])
  header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
  wrong_span = dict(header, a=dict(header["a"], data_offsets=[0, 12]))
  cases = {
      _safetensors_with_header(tmp_path, "json.safetensors", b"{garbage}", data):
          "corrupt header, not JSON",
      _safetensors_with_header(tmp_path, "span.safetensors", json.dumps(wrong_span).encode(),
                               data): r"'a': data_offsets \[0, 12\] do not hold F32 of shape",
      _safetensors_with_header(tmp_path, "dtype.safetensors", json.dumps(
          dict(header, a=dict(header["a"], dtype="F99"))).encode(), data): "'a' has dtype 'F99'",
      _source(tmp_path, "cut.safetensors", raw[:-8]): r"tensors take 24 bytes, the file holds "
      r"16 after the header \(truncated\)",
      _source(tmp_path, "long.safetensors", struct.pack("<Q", 1 << 40) + b"{}"): None,
  }
  for path, what in cases.items():
    if what is None:  # An absurd header length: not even taken for a safetensors file.
      with pytest.raises(errors.UserError, match="is not a PyTorch file"):
        ckpt.load_state_dict(path)
      continue
    with pytest.raises(errors.UserError, match=f"^--src={path}: not a readable safetensors "
                       f"file \\(.*{what}"):
      ckpt.load_state_dict(path)
    with pytest.raises(errors.UserError, match=f"^vae.weights = '{path}': not a readable "
                       f"safetensors file \\(.*{what}"):
      sd_vae.load_params(vae_config(path))
  np.testing.assert_array_equal(readers.SafetensorsFile(good)["a"], np.arange(6).reshape(2, 3))


def test_vae_and_inception_weights_that_cannot_be_read_are_named(tmp_path):
  notes = _source(tmp_path, "notes.safetensors", b"not weights")
  os.mkdir(tmp_path / "dir.safetensors")
  for path, what in ((notes, "not a readable safetensors file"),
                     (str(tmp_path / "dir.safetensors"), "is a folder, not a file"),
                     (str(tmp_path / "no.safetensors"), "no such file")):
    with pytest.raises(errors.UserError, match=f"^vae.weights = '{path}': {what}"):
      sd_vae.load_params(vae_config(path))
  # A file of the right format but another architecture: one line too.
  other = write_weights(tmp_path / "other.safetensors", layers_per_block=2,
                        block_out_channels=(8, 16), latent_channels=1, in_channels=3,
                        norm_groups=4)
  with pytest.raises(errors.UserError) as err:
    sd_vae.load_params(vae_config(other))
  assert str(err.value).startswith(f"vae.weights = '{other}': does not fit the configured "
                                   "SD-VAE: "), str(err.value)
  assert "in the file but read by nothing (another architecture?)" in str(err.value)
  assert len(str(err.value).splitlines()) == 1
  weights = _source(tmp_path, "w.npz", b"PK\x03\x04 cut short")
  with pytest.raises(errors.UserError, match=rf"^eval.inception_weights = '{weights}': not a "
                     r"readable .npz \("):
    inception_fid.load_variables(weights)
  with pytest.raises(errors.UserError, match=r"^eval.reference = '.*w.npz': not a readable "
                     r"\.npz"):
    evaluate.read_images(weights)


def test_heads_are_checked_against_the_width():
  sd = official_dit_state_dict()
  for heads in (7, 0, -2):
    with pytest.raises(errors.UserError, match=rf"^--heads={heads}: does not divide the width "
                       r"64; pass one of \[1, 2, 4, 8, 16, 32, 64\]"):
      ckpt.convert(sd, heads)
  assert ckpt.convert(sd, 8)[1]["heads"] == 8


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_a_half_precision_state_dict_imports(tmp_path, dtype):
  sd = official_dit_state_dict(dtype=dtype)
  # The table rounded to the dtype is off by more than float32's 1e-5 (fp16: 2.4e-4 at
  # DiT-XL's width): judged by the file's dtype, it imports.
  exact = official_dit_state_dict(dtype=np.float32)["pos_embed"]
  assert np.abs(sd["pos_embed"].astype(np.float32) - exact).max() > 1e-5
  path = str(tmp_path / "half.safetensors")
  save_torch({k: torch.from_numpy(v.astype(np.float32)).to(
      torch.float16 if dtype == np.float16 else torch.bfloat16) for k, v in sd.items()}, path)
  for source in (sd, ckpt.load_state_dict(path)):
    params, _ = ckpt.convert(source, HEADS)
    np.testing.assert_array_equal(params["block1"]["attn"]["qkv"]["kernel"],
                                  sd["blocks.1.attn.qkv.weight"].astype(np.float32).T)
    assert params["block1"]["attn"]["qkv"]["kernel"].dtype == np.float32
  # In float32 the same rounding error is a layout error: the tolerance follows the dtype.
  rounded = {k: v.astype(np.float32) for k, v in sd.items()}
  with pytest.raises(errors.UserError, match=r"pos_embed differs from our 2-D sin-cos embedding "
                     r"by .* \(more than 1e-05 for float32\)"):
    ckpt.convert(rounded, HEADS)


def test_non_finite_weights_are_refused_naming_the_tensor():
  sd = official_dit_state_dict()
  sd["blocks.1.mlp.fc2.weight"][3, :5] = np.nan
  sd["blocks.1.mlp.fc2.weight"][0, 0] = np.inf
  with pytest.raises(errors.UserError, match=r"^the state dict: tensor 'blocks.1.mlp.fc2.weight' "
                     r"holds 6 non-finite values \(NaN or inf\) of 16384"):
    ckpt.convert(sd, HEADS)


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
  return out


def test_pt_and_safetensors_sources_convert_identically(tmp_path):
  sd = official_dit_state_dict(seed=4)
  pt, st = str(tmp_path / "w.pt"), str(tmp_path / "w.bin")  # The suffix does not decide.
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pt)
  save_numpy(sd, st)
  want, arch = ckpt.convert(sd, HEADS)
  for path in (pt, st):
    got, got_arch = ckpt.convert(ckpt.load_state_dict(path), HEADS, f"--src={path}")
    assert got_arch == arch
    assert sorted(_flat(got)) == sorted(_flat(want))
    for k, v in _flat(want).items():
      np.testing.assert_array_equal(_flat(got)[k], v, err_msg=k)
  # A DiT training checkpoint (model, ema, args as an argparse.Namespace) reads its "ema".
  import argparse
  train = str(tmp_path / "train.pt")
  torch.save({"model": {}, "ema": {k: torch.from_numpy(v) for k, v in sd.items()},
              "args": argparse.Namespace(model="DiT-XL/2")}, train)
  np.testing.assert_array_equal(ckpt.convert(ckpt.load_state_dict(train), HEADS)[0]["y_embed"]
                                ["embedding"], sd["y_embedder.embedding_table.weight"])


def test_latent_shards_must_agree_with_metadata(tmp_path):
  folder = latents.write_random(str(tmp_path / "lat"), shape=(2, 2, 4), num_records=6,
                                num_classes=3, dtype="float16", shard_size=4)
  assert len(latents.LatentSource(folder)) == 6
  meta_path = os.path.join(folder, latents.METADATA)
  with open(meta_path) as f:
    meta = json.load(f)
  shard0 = os.path.join(folder, latents.shard_name(0, 2))

  def with_meta(**changes):
    with open(meta_path, "w") as f:
      json.dump(dict(meta, **changes), f)

  with_meta(dtype="float32")
  with pytest.raises(errors.UserError, match=rf"^{shard0}: records of 68 bytes, but "
                     r"metadata.json's shape \[2, 2, 4\] and dtype float32 make 132 \(they fit "
                     r"float16\); shards and metadata from different encodings"):
    latents.LatentSource(folder)
  with_meta(shape=[4, 4, 4])
  with pytest.raises(errors.UserError, match=r"records of 68 bytes, but metadata.json's shape "
                     r"\[4, 4, 4\] and dtype float16 make 260;"):
    latents.LatentSource(folder)
  with_meta(num_records=7)
  with pytest.raises(errors.UserError, match=r"the shards hold 6 records, metadata.json says 7"):
    latents.LatentSource(folder)
  with_meta(shape=[2, 2])
  with pytest.raises(errors.UserError, match=rf"^{meta_path}: shape \[2, 2\], dtype 'float16'"):
    latents.LatentSource(folder)
  with open(meta_path, "w") as f:
    f.write('{"format": "sgjax-latents-v1", ')  # Cut short.
  with pytest.raises(errors.UserError, match=rf"^{meta_path}: not a readable JSON file \("):
    latents.LatentSource(folder)
  with_meta()
  with open(shard0, "wb") as f:
    f.write(b"not an array record")
  with pytest.raises(errors.UserError, match=rf"^{shard0}: not a readable ArrayRecord shard \("):
    latents.LatentSource(folder)
