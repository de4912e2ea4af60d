# The README's two commands. Both create .venv and install what they need, so they work
# on a fresh machine; re-running them is fast because the install is stamped.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

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
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/gateway_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
