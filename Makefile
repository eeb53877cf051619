# kfeed — every workflow is one target. `make demo` and `make test` install what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv manages the virtual environment from uv.lock; it is bootstrapped with pip when missing.
UV := $(shell command -v uv 2>/dev/null || echo uv)
VENV_STAMP := .venv/.kfeed-synced
NODE_STAMP := node_modules/.kfeed-installed
PYTEST_ARGS ?=
# Two xdist workers, one test file each at a time (module fixtures stay shared): most of the suite
# waits on real processes, so two workers fit a 2-core machine. `make test PYTEST_WORKERS=0` runs serially.
PYTEST_WORKERS ?= 2

.PHONY: help install demo test web browser gen check-gen lint buf-lint buf-breaking typecheck bench ci clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-13s %s\n", $$1, $$2}'

$(VENV_STAMP): pyproject.toml uv.lock clients/python/pyproject.toml
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
	@# With the bytecode of every installed module, and of kfeed's own: a process then starts
	@# without compiling what it imports, also where PYTHONDONTWRITEBYTECODE is set (this
	@# project's machines set it: every `kfeed` command and test process compiled ≈600 modules,
	@# 2-4 s). A later edit only makes that one file compile again, in memory.
	uv sync --frozen --compile-bytecode
	uv run --frozen python -m compileall -q -j 0 server cli ingest sim clients/python/src
	@touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

install: $(VENV_STAMP) $(NODE_STAMP) ## Install Python (uv) and Node (buf) dependencies

# The dashboard (web/): its own npm dependencies, built by Vite into web/dist (not committed),
# rebuilt when its sources or the generated TypeScript change.
WEB_STAMP := web/node_modules/.kfeed-installed
WEB_SOURCES := $(shell find web/src -type f 2>/dev/null) web/index.html web/vite.config.ts \
	web/tsconfig.json $(wildcard clients/typescript/src/gen/kfeed/v1/*.ts)

$(WEB_STAMP): web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

web/dist/index.html: $(WEB_STAMP) $(WEB_SOURCES)
	cd web && npm run --silent build

web: web/dist/index.html ## Build the dashboard into web/dist (served by kfeed serve --web-listen)

browser: ## Debian's Chromium for the browser tests (apt-get as root; never a downloaded browser)
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@command -v chromium >/dev/null 2>&1 || echo "no chromium: the browser tests will skip (apt-get install chromium)"

demo: $(VENV_STAMP) web/dist/index.html ## Run the simulator, the server on SQLite (./data), the ingest and the dashboard, live
	uv run kfeed demo

test: $(VENV_STAMP) $(NODE_STAMP) web/dist/index.html browser ## Run the test suite (SQLite and PostgreSQL at 127.0.0.1:5432; browser tests in Chromium)
	uv run pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

gen: $(VENV_STAMP) ## Regenerate all generated code from proto/
	uv run python scripts/gen.py

GENERATED := clients/python/src/kfeed clients/betterproto/src clients/typescript/src/gen
check-gen: gen ## Fail when the committed generated code differs from a fresh `make gen`
	@git add --intent-to-add $(GENERATED) >/dev/null 2>&1 || true
	@git diff --exit-code --stat -- $(GENERATED) || { echo "generated code is stale: run 'make gen' and commit"; exit 1; }

buf-lint: $(NODE_STAMP) ## buf lint (STANDARD rules)
	npx --no-install buf lint

buf-breaking: $(NODE_STAMP) ## buf breaking against the published contract
	bash scripts/buf-breaking.sh

lint: $(VENV_STAMP) buf-lint ## ruff (lint, format), import-linter layer contracts, vulture, buf lint
	uv run ruff check .
	uv run ruff format --check .
	uv run lint-imports
	uv run vulture

typecheck: $(VENV_STAMP) ## mypy --strict on hand-written code
	uv run mypy

bench: $(VENV_STAMP) ## Run the benchmarks (ratios against baselines in the same run)
	uv run python -m bench

ci: lint typecheck buf-breaking check-gen test ## Everything CI checks

clean: ## Remove build products and caches (keeps ./data)
	rm -rf .venv node_modules .mypy_cache .ruff_cache .pytest_cache dist build
