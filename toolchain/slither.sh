#!/usr/bin/env bash
# Static analysis of contracts/ with slither, through the project's solc (npm build behind toolchain/solc.js).
# slither-analyzer lives in its own venv (.slither-venv) because its pins clash with eth-brownie's.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .slither-venv/bin/slither ]; then
  echo "creating .slither-venv with slither-analyzer (once)"
  python3 -m venv .slither-venv
  .slither-venv/bin/pip install -q --disable-pip-version-check slither-analyzer
fi
exec .slither-venv/bin/slither contracts --solc-standard-json --solc toolchain/solcx/solc-v0.8.28 \
  --solc-remaps "@openzeppelin=node_modules/@openzeppelin" --filter-paths node_modules --fail-medium "$@"
