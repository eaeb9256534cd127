"""megatron_tfree: train tokenizer-free (T-Free) and classic-tokenizer LLMs with DeepSpeed."""

__version__ = "0.1.0"
