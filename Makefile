# Two commands for a new user: `make demo` and `make test`. Both create/refresh .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= workdirs/demo
# Tests run in parallel on the machine's cores (2 on the reference machine).
PYTEST_WORKERS ?= auto

.PHONY: demo test install bench clean torch-venv

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m emonet_jax.main --config=configs/hq.py:demo --workdir=$(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) tests

bench: $(STAMP)
	$(PY) -m emonet_jax.bench pipeline

# The PyTorch baselines of the benchmarks (benchmarks/*.py) run in their own venv with torch
# alone (CPU wheel); torch is never a dependency of the project.
TORCH_VENV := .venv-torch
torch-venv: $(TORCH_VENV)/.installed

$(TORCH_VENV)/.installed:
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install --quiet --retries 0 --timeout 10 --extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0
	touch $@

clean:
	rm -rf $(VENV) $(TORCH_VENV) workdirs .pytest_cache
