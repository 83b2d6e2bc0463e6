# `make run` and `make test` install whatever is missing into .venv (from requirements.lock), then do their job.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: run test install lock

run: $(STAMP)
	dvc repro
	dvc push
	sonogen registry list

test: $(STAMP) $(CHROMIUM)
	python -m pytest -q

install: $(STAMP)

# the reader study's page is tested in a real browser: Debian's Chromium, driven by Playwright
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && apt-get install -y -qq chromium

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "sonogen needs Python 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# Re-resolve requirements.lock after changing the dependencies in pyproject.toml; existing pins are kept
# (delete a line to upgrade that package).
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	.lock-venv/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements.lock
	rm -rf .lock-venv
