# The README's commands. `make setup` installs everything (into the active venv, or .venv/);
# `make test` runs the test suite in that environment.
VENV_PY := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV)/bin/python,$(CURDIR)/.venv/bin/python)

.PHONY: setup check test test-all main

setup:
	bash scripts/setup.sh

# Imports work and every installed version is the one pinned in requirements.txt.
check:
	bash scripts/setup.sh check

test:
	$(VENV_PY) -m pytest -q -m "not slow"

test-all:
	$(VENV_PY) -m pytest -q

# The main job: train + evaluate on the embedded synthetic data (CPU, ~6-7 min), prints PQ.
main:
	$(VENV_PY) train_net.py --config-file configs/synthetic_panoptic_128.yaml
