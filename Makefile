# `make demo` and `make test` work on a fresh machine: they create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip --disable-pip-version-check -q
PARALLEL := -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: venv test unit bytecode demo docs clean

venv: $(STAMP)

# torch first, pinned to the CPU build on this machine's disk, and named again beside the package: left out, pip's
# resolver replaced it with a CUDA build (2.14.1 and 3 GB of NVIDIA libraries) that no test uses and every process
# that imports torch paid for.
TORCH := torch==2.13.0
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools
	$(PIP) install $(TORCH)
	$(PIP) install $(TORCH) -e '.[test,demo]'
	touch $(STAMP)

# Lint and format check first (ruff, configured in pyproject.toml), then the suite on two workers (pytest-xdist):
# each module runs whole on one worker (its own Ray and S3 server), the longest modules first (tests/conftest.py).
test: $(STAMP) bytecode
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q $(PARALLEL)

# The tests that need no S3 server, Ray, Serve or model: under a minute.
unit: $(STAMP) bytecode
	$(PY) -m pytest -q $(PARALLEL) tests/unit

# The project's bytecode, written once: with PYTHONDONTWRITEBYTECODE set (as on CI's machine) every process the suite
# starts (jobs, Ray workers, Serve replicas: hundreds) would compile pipeline/ again, 0.3 CPU-s each.
bytecode: $(STAMP)
	$(PY) -m compileall -q -j 0 pipeline jobs kit benchmarks tests

demo: $(STAMP)
	$(PY) -m jobs.demo --config configs/demo.yaml

# The reference pages written from the code: docs/configuration.md, docs/api.md, docs/openapi.json.
docs: $(STAMP)
	$(PY) -m jobs.docs

clean:
	rm -rf .demo .pytest_cache
