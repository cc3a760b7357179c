# The README's commands. `make setup` installs everything (into the active venv, or .venv/);
# `make test` runs the test suite in that environment.
VENV_PY := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV)/bin/python,$(CURDIR)/.venv/bin/python)

.PHONY: setup test test-all demo-run

setup:
	bash scripts/setup.sh

test:
	$(VENV_PY) -m pytest -q -m "not slow"

test-all:
	$(VENV_PY) -m pytest -q
