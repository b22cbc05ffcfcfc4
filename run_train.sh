#!/usr/bin/env bash
# Train with torchrun. Environment:
#   NGPU         processes per node (default 1)
#   NNODES       how many nodes (machines) train together (default 1); start ./run_train.sh once on
#                each, with the same NNODES, MASTER_ADDR, MASTER_PORT and RDZV_ID
#   NODE_RANK    this node's number, 0 to NNODES-1 (default 0). Node 0 hosts the rendezvous at
#                MASTER_ADDR:MASTER_PORT; node k runs the global ranks k*NGPU to k*NGPU+NGPU-1
#   MASTER_ADDR  the address of node 0, as every node reaches it (default localhost)
#   MASTER_PORT  a free TCP port on node 0 for the rendezvous (required with NNODES>1; with one
#                node, unset means any free port)
#   RDZV_ID      the job's name in the rendezvous (default savepoint): the same on every node
#   CONFIG_FILE  TOML config (default configs/debug_model.toml)
#   LOG_RANK     ranks whose output is shown, comma-separated (default 0)
#   MAX_RESTARTS how many times torchrun (--max-restarts) restarts every worker after one fails
#                (default 0: the first failed worker fails the job). Each restart resumes from the
#                newest checkpoint (docs/recovery.md). A preemption (SIGTERM) is no failure: the
#                workers save and exit 0, and after SIGTERM nothing is restarted.
# Extra arguments are config overrides, e.g. --checkpoint.enable --training.steps 20
# Relative paths (CONFIG_FILE, --job.dump_folder, ...) resolve against the current directory.
# With several nodes, every node must save into one shared folder at the same path
# (docs/parallelism.md#several-nodes); the job checks it before the first step.
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
NNODES=${NNODES:-1}
if [[ ! "$NNODES" =~ ^[0-9]+$ ]] || (( 10#$NNODES < 1 )); then
    echo "error: NNODES=$NNODES: give the number of nodes (machines) that train together (1 or more), e.g." \
         "NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 ./run_train.sh, or leave NNODES unset for 1" >&2
    exit 1
fi
NNODES=$((10#$NNODES))
NODE_RANK=${NODE_RANK:-0}
if [[ ! "$NODE_RANK" =~ ^[0-9]+$ ]] || (( 10#$NODE_RANK >= NNODES )); then
    echo "error: NODE_RANK=$NODE_RANK: give this node's number among the NNODES=$NNODES node(s), 0 to" \
         "$((NNODES - 1)) (0 on the node at MASTER_ADDR, each number on one node), or leave NODE_RANK unset for 0" >&2
    exit 1
fi
NODE_RANK=$((10#$NODE_RANK))
MASTER_ADDR=${MASTER_ADDR:-localhost}
if [[ ! "$MASTER_ADDR" =~ ^([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])$ ]]; then
    echo "error: MASTER_ADDR=$MASTER_ADDR: give the host name or IP address of node 0 (NODE_RANK=0) as every" \
         "node reaches it, e.g. MASTER_ADDR=node0 or MASTER_ADDR=10.0.0.1, or leave it unset for localhost" >&2
    exit 1
fi
if [[ -z "${MASTER_PORT:-}" ]] && (( NNODES > 1 )); then
    echo "error: NNODES=$NNODES needs MASTER_PORT: every node joins the rendezvous at MASTER_ADDR:MASTER_PORT on" \
         "node 0; give a free TCP port of node 0, the same on every node, e.g. MASTER_PORT=29500" >&2
    exit 1
fi
MASTER_PORT=${MASTER_PORT:-0}
if [[ ! "$MASTER_PORT" =~ ^[0-9]+$ ]] || (( 10#$MASTER_PORT > 65535 )) || (( 10#$MASTER_PORT < (NNODES > 1) )); then
    echo "error: MASTER_PORT=$MASTER_PORT: give a free TCP port of node 0 for the rendezvous (1 to 65535, the" \
         "same on every node), e.g. MASTER_PORT=29500; with one node, leave it unset for any free port" >&2
    exit 1
fi
MASTER_PORT=$((10#$MASTER_PORT))
RDZV_ID=${RDZV_ID:-savepoint}
if [[ ! "$RDZV_ID" =~ ^[A-Za-z0-9._-]+$ ]]; then
    echo "error: RDZV_ID=$RDZV_ID: give the job's name in the rendezvous (letters, digits, '.', '_', '-'), the" \
         "same on every node, or leave it unset for savepoint" >&2
    exit 1
fi
LOG_RANK=${LOG_RANK:-0}
export CONFIG_FILE=${CONFIG_FILE:-$root/configs/debug_model.toml}

source "$root/scripts/bootstrap.sh"
# Validate the config before starting any process, so a typo costs a second and prints one line.
SAVEPOINT_WORLD_SIZE="$((NGPU * NNODES))" "$PY" -m savepoint check "$@"
for arg in "$@"; do [[ "$arg" == "--help" || "$arg" == "-h" ]] && exit 0; done

# The c10d rendezvous; node 0 hosts its store (is_host), the others connect to it. savepoint.launch numbers
# the nodes by NODE_RANK (plain torchrun ignores it with c10d and numbers them in the order it sees them).
nodes=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --rdzv_id "$RDZV_ID")
if (( NNODES > 1 )); then nodes+=(--rdzv_conf "is_host=$(( NODE_RANK == 0 ))"); fi
exec "$PY" -m savepoint.launch --nproc_per_node="$NGPU" "${nodes[@]}" --rdzv_backend c10d \
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --max-restarts "$MAX_RESTARTS" --local-ranks-filter "$LOG_RANK" \
    --role rank --tee 3 -m savepoint train "$@"
