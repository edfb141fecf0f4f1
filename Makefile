# Two commands do everything on a fresh machine:
#   make demo   create .venv if missing, install, run the demo: the paper's claims on a toy world
#               (CPU, ~10 min; outputs/demo/report.md, convergence.png, samples.png)
#   make smoke  the trainer's smoke test: tiny random SD3, two random teachers (config/opd.py:tiny_mopd)
#   make test   create .venv if missing, install, run the whole (non-slow) test suite
#   make wheel-check  build the wheel, install it in a fresh venv outside the repo, run its commands
#
# Torch: if the venv (or the python you point VENV_PYTHON at) can already import torch and
# torchvision, they are kept. Otherwise TORCH_SPEC is installed (the pair known to work here).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= ocr,video,dev
PYTEST_ARGS ?=

.PHONY: env demo smoke test test-slow test-all wheel-check constraints clean-env

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	@$(PY) -c "import torch, torchvision" 2>/dev/null \
		&& echo "[setup] keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| (echo "[setup] installing $(TORCH_SPEC)" && $(PY) -m pip install -q $(TORCH_SPEC))
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $@

env: $(VENV)/.installed

demo: env
	$(PY) scripts/demo.py

smoke: env
	$(PY) -m diffusion_opd.train --config config/opd.py:tiny_mopd output_dir=outputs/tiny_mopd

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The wheel in a fresh venv outside the repo: console commands, a named config, the smoke run, an eval.
wheel-check: env
	bash .ci/wheel_check.sh $(abspath $(PY))

# The tested set, pinned (after `make test` passed in this venv).
constraints: env
	@{ echo "# The tested set: every package of the environment \`make test\` passed in (Python $$($(PY) -c 'import platform; print(platform.python_version())'), $$(uname -sm), CPU)."; \
	  echo "# Install exactly it with:  pip install -c constraints.txt -e \".[ocr,dev]\""; \
	  echo "# Regenerate after a tested upgrade:  make constraints"; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^diffusion[-_]opd'; } > constraints.txt

test-slow: env
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: env
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)
