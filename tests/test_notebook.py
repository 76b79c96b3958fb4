"""The Colab demo notebook runs top to bottom on CPU (tiny override): devices shown, a model
trained, CFG and SG grids displayed inline and written, the FLOP table printed, the workdir
sampled from Python (sgjax.load)."""

import os
import re

import nbclient
import nbformat
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu_demo.ipynb")


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def test_colab_notebook_executes_on_cpu(tmp_path, monkeypatch):
  workdir = tmp_path / "demo"
  # The kernel inherits this environment (8 fake CPU devices, the run's compilation cache).
  monkeypatch.setenv("SGJAX_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("SGJAX_NOTEBOOK_WORKDIR", str(workdir))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not any(o.output_type == "error" for o in c.outputs) for c in code)

  assert "backend cpu: 8 device(s)" in _text(code[1])
  # The pre-flight on a CPU runtime: the train step compiled for Colab's TPU (v5e-1), fitting.
  preflight = _text(code[3])
  assert "pre-flight for v5litepod-1" in preflight
  assert re.search(r"^train_step .* FITS \(\+[\d.]+ GiB of 16\)$", preflight, re.M), preflight
  assert "trained to step 2" in _text(code[4])
  # The demo's grids (unguided, CFG, SG) shown inline and written: 10 class rows of 28-pixel
  # images (saved at 2x).
  shown = [o for o in code[5].outputs if o.output_type == "display_data"]
  assert len(shown) == 3 and all("image/png" in o.data for o in shown)
  for rule in ("none", "cfg", "sg"):
    grid = np.asarray(Image.open(workdir / f"samples_{rule}.png"))
    assert grid.shape[0] >= 10 * 28 * 2
  # The FLOP table: SG's guided step (one routed forward) costs less than CFG's (two dense).
  table = _text(code[6])
  rows = {m[1]: (float(m[2]), float(m[3]))
          for m in re.finditer(r"^(guided step|sampler per image)\s+([\d.]+)\s+([\d.]+)$", table,
                               re.M)}
  assert set(rows) == {"guided step", "sampler per image"}, table
  cfg, sg = rows["guided step"]
  assert 0 < sg < cfg
  assert np.isclose(rows["sampler per image"][0], 2 * cfg)  # Two sampling steps.
  # sgjax.load of the workdir: one image per class, shown, and SG's GMACs below CFG's.
  python = _text(code[7])
  assert "(10, 28, 28, 1) uint8" in python, python
  assert [o.output_type for o in code[7].outputs].count("display_data") == 1
  m = re.search(r"^SG ([\d.]+) GMACs per image, CFG ([\d.]+)$", python, re.M)
  assert m and 0 < float(m[1]) < float(m[2]), python
