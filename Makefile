# certorch: set-up, demo and tests. Everything works offline on a fresh machine
# given the PyPI registry (torch==2.13.0 CPU wheel is picked up from the local wheel dir).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
STAMP := $(VENV)/.certorch-installed

.PHONY: install demo test test-all bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test,verify,dist]"
	# Peer libraries for cross-checks: --no-deps so they never pull another torch.
	$(PIP) install --no-deps "auto-lirpa==0.3" "convex-adversarial==0.4.4" "appdirs>=1.4"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/certorch demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

bench: $(STAMP)
	$(PY) benchmarks/bounds.py

clean:
	rm -rf $(VENV) runs .pytest_cache
