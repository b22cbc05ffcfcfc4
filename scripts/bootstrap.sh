#!/usr/bin/env bash
# Creates ./.venv with savepoint installed (editable), unless it is already there.
# Usage: [SAVEPOINT_EXTRAS=test] source scripts/bootstrap.sh   ("test" also installs the test tools),
# or bash scripts/bootstrap.sh to only make the venv (what the benchmarks need).
# Sets PY to the interpreter to use. SAVEPOINT_PYTHON=/path/to/python skips the venv entirely.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extra="${SAVEPOINT_EXTRAS:-}"
if [[ -n "${SAVEPOINT_PYTHON:-}" ]]; then
    PY="$SAVEPOINT_PYTHON"
    return 0 2>/dev/null || exit 0
fi
venv="$root/.venv"
stamp="$venv/.savepoint-installed${extra:+-$extra}"
if [[ ! -f "$stamp" || "$root/pyproject.toml" -nt "$stamp" ]]; then
    echo "setting up $venv (one time) ..." >&2
    [[ -x "$venv/bin/pip" ]] || python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
    spec="$root${extra:+[$extra]}"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec" 2>&1 \
        | grep -v "is ignored" >&2 || true
    "$venv/bin/python" -c "import savepoint, torch" || { echo "error: installing savepoint into $venv failed" >&2; exit 1; }
    touch "$stamp"
fi
PY="$venv/bin/python"
