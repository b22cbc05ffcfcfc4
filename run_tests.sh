#!/usr/bin/env bash
# Run the whole test suite (installs savepoint and the test tools into ./.venv on first use).
# Extra arguments go to pytest, e.g. ./run_tests.sh -k resume
set -euo pipefail
cd "$(dirname "$0")"
SAVEPOINT_EXTRAS=test source scripts/bootstrap.sh
exec "$PY" -m pytest "$@"
