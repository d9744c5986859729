#!/usr/bin/env bash
# Runs callstream's checks and tests; installs first (scripts/install.sh skips what is already done).
# On CI (CI=true) slow model tests run in their reduced form; CALLSTREAM_FULL_TESTS=1 runs them in full.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check services tests
.venv/bin/ruff format --check services tests
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
