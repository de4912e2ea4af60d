# The README's two commands. Both create .venv and install what they need, so they work
# on a fresh machine; re-running them is fast because the install is stamped.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The demo installs only what it runs (the gateway and the simulator); the tests install
# everything. A full install also satisfies the demo.
STAMP      := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-gateway

.PHONY: demo test lint bench images clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(DEMO_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[gateway]'
	@touch $(DEMO_STAMP)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP) $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	@scripts/ensure-tools.sh
	@scripts/chart-tools.sh
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/gateway_bench.py

# Container images (where Docker exists): tollgate/{gateway,operator,gpu-exporter}:VERSION,
# the names and tags the Helm chart and the operator default to.
IMAGE_TAG := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
images:
	@command -v docker >/dev/null 2>&1 || { echo "make images: docker is not installed" >&2; exit 1; }
	@for image in gateway operator gpu-exporter; do \
	  docker build -f docker/Dockerfile.$$image -t tollgate/$$image:$(IMAGE_TAG) . || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
