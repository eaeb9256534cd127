#!/usr/bin/env bash
# The reference 7B T-Free run (configs/7b_fineweb.yaml) on 32 nodes x 8 GPUs (ZeRO-1, data parallel
# 256: 1024 sequences of 4096 words per step). Check a layout first:
#   python -m megatron_tfree.plan --config configs/7b_fineweb.yaml --nodes 32 --gpus-per-node 8
# Submit from the repository root; extra arguments are config overrides:
#   sbatch slurm/7b.sh [section.key=value ...]
#   sbatch --nodes=16 slurm/7b.sh parallel.tensor=2
# Environment: CONFIG, SAVE_DIR, VENV, NCCL_* ... (see slurm/launch.sh).
#SBATCH --job-name=tfree-7b
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
export REPO
CONFIG=${CONFIG:-configs/7b_fineweb.yaml}
# Stable across requeues (not derived from the job id), absolute so every node agrees.
export SAVE_DIR=${SAVE_DIR:-$REPO/checkpoints/7b_fineweb}
exec bash "$REPO/slurm/launch.sh" "$CONFIG" "$@"
