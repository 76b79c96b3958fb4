# The README's two commands. Both set everything up on a fresh machine (Debian + Python 3.11+).
PY ?= python3
VENV ?= .venv
WORKDIR ?= workdirs/fashion_mnist_demo
ARGS ?=

.PHONY: setup setup-dev data device-data shellcheck demo test lint clean

# The project installed editable (its dependencies are requirements.txt, read by pyproject.toml),
# plus the test tools.
$(VENV)/.installed: pyproject.toml requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e . -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST's idx files from Debian (needs root; skipped when already there).
data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { (apt-get update -qq || true) && apt-get install -y -qq dataset-fashion-mnist; }

# The idx files copied into the checkout (git-ignored), for a GPU device run to carry
# (launch/gpu_sweep.sh); the device machine gets the checkout only.
device-data: data
	mkdir -p data/fashion-mnist
	cp /usr/share/datasets/fashion-mnist/*-ubyte.gz data/fashion-mnist/

# shellcheck for tests/test_launch.py, from Debian (needs root; skipped when already there).
shellcheck:
	@command -v shellcheck >/dev/null || \
	  { (apt-get update -qq || true) && apt-get install -y -qq shellcheck; }

# 1. Train the demo, then sample CFG and SG side by side.
demo: setup data
	$(VENV)/bin/python -m sgjax.main --config=configs/fashion_mnist.py --workdir=$(WORKDIR) \
	  --mode=demo $(ARGS)

# 2. The test suite (8 fake CPU devices; see tests/conftest.py).
test: setup data shellcheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -n 2 tests $(ARGS)

clean:
	rm -rf $(VENV) workdirs
