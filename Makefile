# Two commands on a fresh machine: `make repro` (run the pipeline) and `make test` (run the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: repro test lint venv dvc-yaml check-dvc-yaml bench clean-venv

venv: $(STAMP)

# Reinstall when the project's dependency files change; versions are pinned by requirements.lock.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev,export]'
	touch $(STAMP)

# dvc.yaml is generated from params.yaml's `backbones:` (DVC cannot name stages train_<b> from a list).
dvc-yaml: $(STAMP)
	$(BIN)/python -m mitdet.pipeline --write

check-dvc-yaml: $(STAMP)
	$(BIN)/python -m mitdet.pipeline --check

# `dvc repro`, with the stale train stages side by side (one `dvc repro --single-item` each, as many at once as the
# cores hold at train.threads + train.num_workers; LANES=1 for one at a time), evaluation alone afterwards.
LANES ?=
repro: $(STAMP)
	$(BIN)/python -m mitdet.pipeline --check
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m mitdet.repro $(if $(LANES),--lanes $(LANES))

# Lint only (pyflakes, bugbear, complexity; config in pyproject.toml); no formatting.
lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/bench_index.py

clean-venv:
	rm -rf $(VENV)
