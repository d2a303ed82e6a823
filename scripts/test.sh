#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the whole test suite. A run that collects no test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test  # everything the tests use
# The layers (docs/architecture.md): a broken import-linter contract fails the run.
.venv/bin/lint-imports --no-cache
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$rc"
