# fedtextseg: the two commands of the README (`make demo`, `make test`) and their building blocks.
# Everything lives in a local virtualenv (.venv); nothing is installed system-wide.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch and torchvision come from one source in one step so their builds match (a CPU wheel of one and a CUDA wheel of the other fail at import).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

# Offline and self-contained: no hub downloads, Flower and Ray keep their state inside the project.
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export FLWR_HOME ?= $(CURDIR)/.flwr
export RAY_TMPDIR ?= /tmp/ray-fedtextseg
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export FEDTEXTSEG_CACHE ?= $(CURDIR)/.cache/fedtextseg

.PHONY: install demo test test-fast test-all clean

$(BIN)/fedtextseg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_PINS)
	$(BIN)/python -m pip install -e ".[dev]"
	@touch $@

install: $(BIN)/fedtextseg

## The main job: synthetic hospitals -> Flower simulation of partially labeled sites -> per-class Dice table.
demo: install
	$(BIN)/fedtextseg simulate --experiment demo

## The full test suite (what CI runs): fast tests plus the slow end-to-end ones. One BLAS/OpenMP thread per
## process: simulations run several processes side by side on few cores.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "slow or not slow" -q --durations=15

## The same selection under the name the pytest marker help gives it.
test-all: test

## The fast default selection for development (no end-to-end simulations).
test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .flwr .cache results data/synthetic
