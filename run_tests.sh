#!/usr/bin/env bash
# Run the test suite (installs savepoint and the test tools into ./.venv on first use).
# Extra arguments go to pytest, e.g. ./run_tests.sh -k resume
# The default run (what CI runs) leaves out the tests marked `slow`: the full kill and corruption trial
# campaigns (minutes to hours each). Run them with ./run_tests.sh -m slow (e.g. -m slow tests/test_kill_trials.py).
# A -m expression replaces the default "not slow"; add "and not slow" to one of your own to keep them out.
set -euo pipefail
cd "$(dirname "$0")"
SAVEPOINT_EXTRAS=test source scripts/bootstrap.sh
exec "$PY" -m pytest "$@"
