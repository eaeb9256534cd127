#!/usr/bin/env bash
# Multi-node launch of megatron_tfree under SLURM: one torchrun per node (srun --ntasks-per-node=1),
# c10d rendezvous on the job's first node. Called (exec) by the sbatch scripts slurm/7b.sh and
# slurm/1b.sh; usable inside any allocation:  slurm/launch.sh CONFIG [section.key=value ...]
#
# Environment (all optional):
#   REPO           repository root (default: $SLURM_SUBMIT_DIR, else the current directory)
#   VENV           virtual environment with torch + deepspeed (default: $REPO/.venv)
#   SAVE_DIR       checkpoint directory, passed as training.save_dir; keep it fixed per run: a requeued
#                  job (same job id) and a resubmitted job resume from $SAVE_DIR/latest
#   GPUS_PER_NODE  processes per node (default: $SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT    rendezvous port on the first node (default: 20000 + job id mod 20000)
#   NCCL_SOCKET_IFNAME (default ^lo,docker), NCCL_IB_DISABLE (default 0), NCCL_IB_HCA, NCCL_DEBUG
#                  (default WARN): NCCL network choice; set them for your fabric
#   TORCHRUN       launcher (default: $VENV/bin/torchrun);  SRUN  (default: srun)
#   DRY_RUN=1      print the environment and the exact srun/torchrun command line; run nothing
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG [section.key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
VENV=${VENV:-$REPO/.venv}
TORCHRUN=${TORCHRUN:-$VENV/bin/torchrun}
SRUN=${SRUN:-srun}
: "${SLURM_JOB_ID:?not inside a SLURM allocation (SLURM_JOB_ID is unset): submit with sbatch}"
: "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is unset}"
: "${SAVE_DIR:?SAVE_DIR must name the checkpoint directory of the run}"
NNODES=${SLURM_NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}

# The first node of the allocation hosts the c10d rendezvous (no ssh: every node reaches it by name).
# (Read all of scontrol's output, then take line 1: `| head -n1` under pipefail can fail on SIGPIPE.)
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${hosts%%$'\n'*}
[[ -n $MASTER_ADDR ]] || { echo "scontrol show hostnames $SLURM_JOB_NODELIST printed no host" >&2; exit 1; }
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

# NCCL: fail fast on a hung or failed collective instead of blocking until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}  # name used by torch < 2.2
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
threads=$(( ${SLURM_CPUS_PER_TASK:-$GPUS_PER_NODE} / GPUS_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

# srun: one task per node; torchrun: GPUS_PER_NODE processes per node. --rdzv_id is the job id,
# which SLURM keeps across a requeue; SAVE_DIR is passed before "$@" so an explicit override wins.
cmd=("$SRUN" --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --cpu-bind=none
     "$TORCHRUN" --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE"
     --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"
     --max_restarts=0
     -m megatron_tfree.train --config "$CONFIG" "training.save_dir=$SAVE_DIR" "$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT NNODES=$NNODES GPUS_PER_NODE=$GPUS_PER_NODE"
    echo "SAVE_DIR=$SAVE_DIR"
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi

# shellcheck disable=SC1091  # the venv is created by scripts/setup.sh
source "$VENV/bin/activate"
mkdir -p "$SAVE_DIR"
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES nodes x $GPUS_PER_NODE GPUs," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, checkpoints $SAVE_DIR (resumes from latest when present)"

# Shortly before the time limit SLURM sends USR1 (#SBATCH --signal=B:USR1@...): requeue the job so
# it continues from the last checkpoint (training.save_interval) in a new allocation.
# shellcheck disable=SC2329  # invoked by the trap below
requeue() {
    echo "USR1: time limit near, requeueing job $SLURM_JOB_ID (resumes from $SAVE_DIR/latest)"
    scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

"${cmd[@]}" &
pid=$!
set +e
while true; do
    wait "$pid"
    rc=$?
    kill -0 "$pid" 2>/dev/null || break  # wait was interrupted by the trap: keep waiting
done
exit "$rc"
