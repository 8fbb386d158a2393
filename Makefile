# `make demo` and `make test` work on a fresh machine: they create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: venv test unit demo docs clean

venv: $(STAMP)

# torch first, pinned to the CPU build on this machine's disk, so the package's torch range installs nothing more.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test,demo]'
	touch $(STAMP)

# Lint and format check first (ruff, configured in pyproject.toml), then the suite.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

# The tests that need no S3 server, Ray, Serve or model: under a minute.
unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

demo: $(STAMP)
	$(PY) -m jobs.demo --config configs/demo.yaml

# The reference pages written from the code: docs/configuration.md, docs/api.md, docs/openapi.json.
docs: $(STAMP)
	$(PY) -m jobs.docs

clean:
	rm -rf .demo .pytest_cache
