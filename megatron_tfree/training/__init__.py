"""Training: DeepSpeed engine setup (:mod:`.engine`), the loop and evaluation (:mod:`.loop`),
checkpoints (:mod:`.checkpoint`), the LR schedule (:mod:`.schedule`) and run metrics (:mod:`.metrics`).

    from megatron_tfree.training import train
    result = train(cfg)          # resumes from training.load_dir or {save_dir}/latest when present
"""

from .loop import NonFiniteLossError, TrainResult, bits_per_byte_fn, evaluate, train

__all__ = ["NonFiniteLossError", "TrainResult", "bits_per_byte_fn", "evaluate", "train"]
