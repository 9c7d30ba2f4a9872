# The two commands of the README: `make run` and `make test`.
# Each builds .venv from pyproject.toml on first use; nothing else is installed by hand.
# The browser SDK and web page (client/web) install from their package-lock.json with
# `npm ci` when node_modules is missing or older than the lock file (Node >= 20).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WEB := client/web
WEB_STAMP := $(WEB)/node_modules/.package-lock.json

.PHONY: run test lint bench clean web web-deps

$(STAMP): pyproject.toml protocol/pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./protocol -e ./client -e '.[test]'
	touch $(STAMP)

$(WEB_STAMP): $(WEB)/package.json $(WEB)/package-lock.json
	npm ci --prefix $(WEB) --no-audit --no-fund --loglevel=error
	touch $(WEB_STAMP)

# Without node/npm the SDK's unit tests are left out and the browser tests skip, saying why.
web-deps:
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory $(WEB_STAMP); \
	else echo "note: npm not found: client/web's tests are skipped (install nodejs >= 20)"; fi

# Rebuild the page the hub serves at /chat/ (client/web/dist, committed).
web: $(WEB_STAMP)
	cd $(WEB) && node build.mjs

run: $(STAMP)
	$(BIN)/hoomi serve

test: $(STAMP) web-deps
	$(BIN)/ruff check protocol storage server client tests bench
	$(BIN)/mypy --strict protocol/hoomi_protocol client/hoomi_client/crypto.py client/hoomi_client/keys.py
	$(BIN)/mypy storage server client/hoomi_client bench
	@if [ -d $(WEB)/node_modules ]; then cd $(WEB) && node --test --test-timeout=120000 test/*.test.js; fi
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.writer
	$(BIN)/python -m bench.hub
	$(BIN)/python -m bench.fanout
	$(BIN)/python -m bench.history

clean:
	rm -rf $(VENV)
