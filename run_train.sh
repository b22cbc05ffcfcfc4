#!/usr/bin/env bash
# Train with torchrun. Environment:
#   NGPU         processes per node (default 1)
#   CONFIG_FILE  TOML config (default configs/debug_model.toml)
#   LOG_RANK     ranks whose output is shown, comma-separated (default 0)
#   MAX_RESTARTS how many times torchrun (--max-restarts) restarts every worker after one fails
#                (default 0: the first failed worker fails the job). Each restart resumes from the
#                newest checkpoint (docs/recovery.md). A preemption (SIGTERM) is no failure: the
#                workers save and exit 0, and after SIGTERM nothing is restarted.
# Extra arguments are config overrides, e.g. --checkpoint.enable --training.steps 20
# Relative paths (CONFIG_FILE, --job.dump_folder, ...) resolve against the current directory.
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
NGPU=${NGPU:-1}
if [[ ! "$NGPU" =~ ^[0-9]+$ ]] || (( 10#$NGPU < 1 )); then
    echo "error: NGPU=$NGPU: give the number of training processes per node (one per GPU; 1 or more)," \
         "e.g. NGPU=2 ./run_train.sh, or leave NGPU unset for 1" >&2
    exit 1
fi
NGPU=$((10#$NGPU))
MAX_RESTARTS=${MAX_RESTARTS:-0}
if [[ ! "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
    echo "error: MAX_RESTARTS=$MAX_RESTARTS: give how many times a failed job restarts its workers (a whole" \
         "number, 0 or more), e.g. MAX_RESTARTS=3 ./run_train.sh, or leave it unset for 0 (no restart)" >&2
    exit 1
fi
MAX_RESTARTS=$((10#$MAX_RESTARTS))
LOG_RANK=${LOG_RANK:-0}
export CONFIG_FILE=${CONFIG_FILE:-$root/configs/debug_model.toml}

source "$root/scripts/bootstrap.sh"
# Validate the config before starting any process, so a typo costs a second and prints one line.
SAVEPOINT_WORLD_SIZE="$NGPU" "$PY" -m savepoint check "$@"
for arg in "$@"; do [[ "$arg" == "--help" || "$arg" == "-h" ]] && exit 0; done

exec "$PY" -m savepoint.launch --nproc_per_node="$NGPU" --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
    --max-restarts "$MAX_RESTARTS" --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
    -m savepoint train "$@"
