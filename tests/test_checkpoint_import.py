"""DiT/SiT checkpoint import: a tiny DiT written here in torch from the paper's description, with
the official state-dict key names, converted and run through our model, gives its outputs.

The reference shares no code with sgjax: its attention, adaLN-Zero blocks, sin-cos tables and
DDPM schedule are written out below, so an error in our model or converter cannot cancel.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sgjax import config as config_lib
from sgjax import errors, sampling, sharding, validation, workdir
from sgjax import guidance as gl
from sgjax import state as state_lib
from sgjax.convert import dit_checkpoint as ckpt
from sgjax.models import dit

DEPTH, WIDTH, HEADS, PATCH, SIZE, CHANNELS, CLASSES = 2, 64, 4, 2, 8, 4, 10


def _pos_table(width, grid):
  """MAE/DiT's fixed table, token i = (row i // grid, col i % grid): first half of the channels
  sin then cos of col·ω, second half of row·ω, ω_j = 10000^(-j / (width/4))."""
  quarter = width // 4
  table = np.zeros((grid * grid, width))
  for i in range(grid * grid):
    row, col = divmod(i, grid)
    for j in range(quarter):
      w = 10000.0 ** (-j / quarter)
      table[i, j], table[i, quarter + j] = math.sin(col * w), math.cos(col * w)
      table[i, 2 * quarter + j], table[i, 3 * quarter + j] = math.sin(row * w), math.cos(row * w)
  return table


class _Block(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.attn = torch.nn.Module()
    self.attn.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
    self.attn.proj = torch.nn.Linear(WIDTH, WIDTH)
    self.mlp = torch.nn.Module()
    self.mlp.fc1 = torch.nn.Linear(WIDTH, 4 * WIDTH)
    self.mlp.fc2 = torch.nn.Linear(4 * WIDTH, WIDTH)
    self.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(WIDTH, 6 * WIDTH))

  def forward(self, x, c):
    b, n, d = x.shape
    sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
    norm = lambda h: torch.nn.functional.layer_norm(h, (d,), eps=1e-6)
    h = norm(x) * (1 + sc1) + sh1
    q, k, v = self.attn.qkv(h).reshape(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // HEADS), dim=-1)
    x = x + g1 * self.attn.proj((att @ v).transpose(1, 2).reshape(b, n, d))
    h = norm(x) * (1 + sc2) + sh2
    h = self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(h), approximate="tanh"))
    return x + g2 * h


class _RefDiT(torch.nn.Module):
  """DiT with learn_sigma (2C output channels), the official module names."""

  def __init__(self):
    super().__init__()
    self.x_embedder = torch.nn.Module()
    self.x_embedder.proj = torch.nn.Conv2d(CHANNELS, WIDTH, PATCH, stride=PATCH)
    grid = SIZE // PATCH
    self.register_buffer("pos_embed",
                         torch.tensor(_pos_table(WIDTH, grid), dtype=torch.float32)[None])
    self.t_embedder = torch.nn.Module()
    self.t_embedder.mlp = torch.nn.Sequential(torch.nn.Linear(256, WIDTH), torch.nn.SiLU(),
                                              torch.nn.Linear(WIDTH, WIDTH))
    self.y_embedder = torch.nn.Module()
    self.y_embedder.embedding_table = torch.nn.Embedding(CLASSES + 1, WIDTH)
    self.blocks = torch.nn.ModuleList([_Block() for _ in range(DEPTH)])
    self.final_layer = torch.nn.Module()
    self.final_layer.linear = torch.nn.Linear(WIDTH, PATCH * PATCH * 2 * CHANNELS)
    self.final_layer.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(),
                                                            torch.nn.Linear(WIDTH, 2 * WIDTH))

  def forward(self, x, t, y):
    """x (B, C, H, W), t (B,) the network's time input, y (B,) -> (B, 2C, H, W)."""
    b = x.shape[0]
    grid = SIZE // PATCH
    h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    c = (self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
         + self.y_embedder.embedding_table(y))
    for block in self.blocks:
      h = block(h, c)
    shift, scale = self.final_layer.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
    h = torch.nn.functional.layer_norm(h, (WIDTH,), eps=1e-6) * (1 + scale) + shift
    h = self.final_layer.linear(h).reshape(b, grid, grid, PATCH, PATCH, 2 * CHANNELS)
    return h.permute(0, 5, 1, 3, 2, 4).reshape(b, 2 * CHANNELS, SIZE, SIZE)


@pytest.fixture(scope="module")
def reference():
  torch.manual_seed(0)
  net = _RefDiT().eval()
  with torch.no_grad():  # Non-zero everywhere: zero-init adaLN would hide most of the network.
    for name, p in net.named_parameters():
      p.copy_(torch.randn_like(p) * (0.3 if "embedding" in name else 0.08))
  return net


def _inputs(batch=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, SIZE, SIZE, CHANNELS)).astype(np.float32)
  y = np.array([0, 3, 9, CLASSES][:batch], np.int32)  # The last one is the null label.
  return x, y


def _ref(net, x_nhwc, t, y):
  """The reference's first C output channels, NHWC."""
  with torch.no_grad():
    out = net(torch.tensor(x_nhwc).permute(0, 3, 1, 2), torch.tensor(t, dtype=torch.float32),
              torch.tensor(y, dtype=torch.long))
  return out[:, :CHANNELS].permute(0, 2, 3, 1).numpy()


def _state_dict(net):
  return {k: v.numpy() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("times", [(0.0, 0.37, 0.8, 1.0), (2.0, 250.5, 640.0, 999.0)])
def test_imported_network_matches_the_reference(reference, times):
  # kind "sit" is the bare network with time input t (DiT's DDPM steps in the second case).
  params, arch = ckpt.convert(ckpt.load_state_dict(reference.state_dict()), HEADS)
  assert arch == dict(depth=DEPTH, width=WIDTH, heads=HEADS, patch_size=PATCH, mlp_ratio=4.0,
                      channels=CHANNELS, image_size=SIZE, num_classes=CLASSES, learn_sigma=True)
  model = ckpt.model(arch, "sit")
  x, y = _inputs()
  t = np.array(times, np.float32)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, x, t, y))
  want = _ref(reference, x, t, y)
  assert np.abs(want).max() > 0.5  # Not a vacuous comparison.
  np.testing.assert_allclose(ours, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_dit_kind_is_the_eps_network_as_a_velocity_on_our_time_axis(reference):
  params, arch = ckpt.convert(_state_dict(reference), HEADS)
  model = ckpt.model(arch, "dit")
  x, y = _inputs()
  t = np.array([0.0, 0.2, 0.6, 0.97], np.float32)  # t = 0 is below DDPM's noisiest step.
  ours = np.asarray(jax.jit(model.apply)({"params": params}, x, t, y))
  # Independent: DDPM's linear-β table; our x_t = t·x0 + (1-t)·ε is DDPM's z / (α + σ) at the
  # step whose α/σ is t/(1-t); outside the table, the end step.
  alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
  ratio = np.sqrt(alpha_bar / (1.0 - alpha_bar))  # α/σ per step, decreasing.
  want = []
  for i, ti in enumerate(t.astype(np.float64)):
    r = np.clip(ti / (1.0 - ti) if ti < 1 else np.inf, ratio[-1], ratio[0])
    # Fractional step: linear in log(α/σ) between the two table entries around r.
    k = int(np.searchsorted(-np.log(ratio), -np.log(r)))
    k0, k1 = max(k - 1, 0), min(k, 999)
    f = 0.0 if k0 == k1 else (np.log(ratio[k0]) - np.log(r)) / (np.log(ratio[k0])
                                                              - np.log(ratio[k1]))
    step = k0 + f * (k1 - k0)
    tc = r / (1.0 + r)
    a, s = r / np.sqrt(1 + r * r), 1 / np.sqrt(1 + r * r)
    eps = _ref(reference, (x[i:i + 1] * (a + s)).astype(np.float32), [step], y[i:i + 1])
    want.append((x[i:i + 1] - eps) / tc)
  want = np.concatenate(want)
  np.testing.assert_allclose(ours, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_pos_embed_and_key_coverage_are_checked(reference):
  sd = _state_dict(reference)
  np.testing.assert_allclose(dit.sincos_pos_embed_2d(WIDTH, SIZE // PATCH),
                             sd["pos_embed"][0], atol=1e-6)
  extra = dict(sd, **{"blocks.0.attn.q_norm.weight": np.ones(16, np.float32)})
  with pytest.raises(errors.UserError,
                     match=r"no place in our model \(1\): \['blocks.0.attn.q_norm.weight'\]"):
    ckpt.convert(extra, HEADS)
  missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
  with pytest.raises(errors.UserError, match=r"lacks \(1\): \['blocks.1.mlp.fc2.bias'\]"):
    ckpt.convert(missing, HEADS)
  moved = dict(sd, pos_embed=sd["pos_embed"][:, ::-1].copy())
  with pytest.raises(errors.UserError, match="pos_embed differs .* not DiT's"):
    ckpt.convert(moved, HEADS)
  with pytest.raises(errors.UserError, match=r"width 64 is not a DiT/SiT size.*--heads"):
    ckpt.architecture(sd)  # Width 64 is no DiT size: heads must be given.


def test_written_workdir_samples_with_our_sampler(reference, tmp_path):
  src = str(tmp_path / "tiny-dit.pt")
  torch.save(reference.state_dict(), src)
  params, arch = ckpt.convert(ckpt.load_state_dict(src), heads=HEADS)
  out = str(tmp_path / "imported")
  path = ckpt.write_workdir(params, arch, "dit", out, src=src)
  # The record marks step 0 as an import (never rotated away); a second import is refused.
  assert workdir.read(out)["base_step"] == 0
  with pytest.raises(errors.UserError, match="is not empty"):
    ckpt.write_workdir(params, arch, "dit", out, src=src)
  config = config_lib.load_config_file(path)
  config.sample.update(steps=3, batch_size=8)
  validation.validate(config, jax.device_count())
  assert (config.model.prediction, config.model.time_scale) == ("eps_vp", 1.0)
  mesh = sharding.build_mesh(config.mesh)
  with jax.set_mesh(mesh):
    model, loaded, step = state_lib.restore_params(config, out, mesh)
  assert step == 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, params)
  plan = gl.config_plan(config)
  assert [s.guidance.rule for s in plan.segments] == ["cfg"]
  labels = jnp.arange(8) % CLASSES
  run = lambda: np.asarray(sampling.sample(model, {gl.MAIN: loaded}, labels, jax.random.key(0),
                                           plan=plan))
  a = run()
  assert a.shape == (8, SIZE, SIZE, CHANNELS) and np.isfinite(a).all() and a.std() > 0.1
  np.testing.assert_array_equal(a, run())
