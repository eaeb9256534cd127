"""The checkpoint format, in one place: what training writes, and what inference, conversion and
export read.

* :mod:`.files`: file names, the run-directory layout, ``latest``, tag resolution
  (:func:`resolve_tag_dir`), the trainer state, atomic files and output directories.
* :mod:`.safe_load`: every ``.pt`` file is read with ``torch.load(weights_only=True)``.
* :mod:`.names`: the model's full parameter names, shapes and tensor-parallel split rules.
* :mod:`.deepspeed_files`: DeepSpeed's files per (TP, PP, DP, ZeRO) layout.
* :mod:`.consolidated`: layout-free directories (full tensors + Adam moments, or weights only).
* :mod:`.reader`: :class:`CheckpointReader`, any checkpoint streamed as (full name, full tensor).
* :mod:`.safetensors_stream`: safetensors written one tensor at a time, sharded.

Training's engine-level save/resume lives in :mod:`megatron_tfree.training.checkpoint` and the
engine-based consolidation (which also gathers the Adam moments) in
:mod:`megatron_tfree.training.consolidate`; both read and write through this package.
"""

from .files import (CONFIG_FILE, LATEST_FILE, STATE_FILE, TOKENIZER_DIR, WORD_COUNTS_FILE, TrainerState,
                    atomic_output_dir, read_latest, resolve_tag_dir, tag_for, write_latest)
from .names import ParamSpec, param_specs
from .reader import CheckpointReader, load_into

__all__ = ["CONFIG_FILE", "LATEST_FILE", "STATE_FILE", "TOKENIZER_DIR", "WORD_COUNTS_FILE", "TrainerState",
           "atomic_output_dir", "read_latest", "resolve_tag_dir", "tag_for", "write_latest", "ParamSpec",
           "param_specs", "CheckpointReader", "load_into"]
