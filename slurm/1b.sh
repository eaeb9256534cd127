#!/usr/bin/env bash
# A ~1B T-Free model (configs/1b.yaml, the paper's 1B ablation tokenizer: v=8192, m=10, k=0) on
# 8 nodes x 8 GPUs (ZeRO-1, data parallel 64: 512 sequences of 4096 words per step). Check a layout:
#   python -m megatron_tfree.plan --config configs/1b.yaml --nodes 8 --gpus-per-node 8
# Submit from the repository root; extra arguments are config overrides:
#   sbatch slurm/1b.sh [section.key=value ...]
#   sbatch --nodes=4 slurm/1b.sh training.micro_batch_size=1
# Environment: CONFIG, SAVE_DIR, VENV, NCCL_* ... (see slurm/launch.sh).
#SBATCH --job-name=tfree-1b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
export REPO
CONFIG=${CONFIG:-configs/1b.yaml}
# Stable across requeues (not derived from the job id), absolute so every node agrees.
export SAVE_DIR=${SAVE_DIR:-$REPO/checkpoints/1b}
exec bash "$REPO/slurm/launch.sh" "$CONFIG" "$@"
