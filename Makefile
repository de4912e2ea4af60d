# The README's two commands. Both create .venv and install what they need, so they work
# on a fresh machine; re-running them is fast because the install is stamped.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench images clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

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
