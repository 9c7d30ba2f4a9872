# The two commands of the README: `make run` and `make test`.
# Each builds .venv from pyproject.toml on first use; nothing else is installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/hoomi serve

test: $(STAMP)
	$(BIN)/ruff check protocol storage server client tests bench
	$(BIN)/mypy --strict protocol client/crypto.py client/keys.py
	$(BIN)/mypy storage server client bench
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.writer
	$(BIN)/python -m bench.hub
	$(BIN)/python -m bench.fanout
	$(BIN)/python -m bench.history

clean:
	rm -rf $(VENV)
