# mailpush — the two commands a newcomer needs: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: run test lint sanitize bench bench-quick bench-deps soak fuzz fuzz-c system-deps build-deps node-deps venv clean

$(STAMP): pyproject.toml setup.py src/mailpush/_speedups.c | build-deps
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench,fuzz,dev]'
	touch $(STAMP)

venv: $(STAMP)

# A C compiler and Python's headers, for mailpush's C fan-out path
# (src/mailpush/_speedups.c). Without them the install still succeeds and
# mailpush runs the same steps in Python; tests/test_speedups.py says so.
build-deps:
	@missing=""; \
	command -v cc >/dev/null || missing="$$missing gcc"; \
	$(PY) -c "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
	  || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	    || echo "could not install$$missing: mailpush will run without its C fan-out path"; \
	fi

# Debian packages the integration tests use for real: redis-server (the
# bus), haproxy (the load balancer in front), chromium (the browser client),
# openssl (a certificate for the Redis TLS test), Node.js and npm (the ws
# interop client and the browser client's tests).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# Node.js packages of the interop tests (the ws client), pinned by the lock file.
NODE_DIR   := tests/interop
NODE_STAMP := $(NODE_DIR)/node_modules/.installed

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The browser client's own packages (ws and esbuild, for its Node tests).
JS_DIR   := clients/js
JS_STAMP := $(JS_DIR)/node_modules/.installed

$(JS_STAMP): $(JS_DIR)/package.json $(JS_DIR)/package-lock.json
	cd $(JS_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

node-deps:
	@if [ -f $(NODE_DIR)/package.json ]; then $(MAKE) --no-print-directory $(NODE_STAMP); fi
	@if [ -f $(JS_DIR)/package.json ]; then $(MAKE) --no-print-directory $(JS_STAMP); fi

run: $(STAMP)
	$(BIN)/mailpush serve --demo

# The browser client's Node tests first, the C extension's tests under
# the sanitizers, then the whole Python suite.
test: lint system-deps node-deps
	cd $(JS_DIR) && npm test --silent
	$(BIN)/python tools/sanitize.py test
	$(BIN)/python -m pytest

# The C extension (src/mailpush/_speedups.c) under AddressSanitizer and
# UBSan: the tests of every C function (part of make test), and fuzzing
# guided into the C code (clang, installed when missing), FUZZ_SECONDS per
# target. See tools/sanitize.py.
sanitize: $(STAMP)
	$(BIN)/python tools/sanitize.py test

fuzz-c: $(STAMP)
	$(BIN)/python tools/sanitize.py fuzz -- --seconds $(FUZZ_SECONDS) --only handshake frames items packets

# The lint gate, part of make test: ruff (lint and format) and mypy on src/,
# and no import cycle among mailpush's modules.
lint: $(STAMP)
	$(BIN)/ruff check src
	$(BIN)/ruff format --check src
	$(BIN)/mypy
	$(BIN)/python tools/import_cycles.py

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick

# The bench's optional peers, installed ahead of a run: the Python ones
# come with the venv's [bench] extra; the Node.js one (ws, pinned by
# bench/node's lock file) is installed here. bench/run.py runs the same
# npm ci itself when bench/node/node_modules is missing, and reports a peer
# it cannot run as skipped.
bench-deps: $(STAMP)
	cd bench/node && npm ci --no-audit --no-fund --loglevel=error

# Coverage-guided fuzzing of every parser, FUZZ_SECONDS per target.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/python fuzz/run.py --seconds $(FUZZ_SECONDS)

# The long-running soak (bench/soak.py): SOAK_SECONDS of steady load, churn,
# slow and malformed clients; report and plot in bench/results/soak*.
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(BIN)/python bench/soak.py --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/mailpush/*.so
