"""Hugging Face in and out.

* :mod:`.export` (``tools/convert2hf.py``): any checkpoint -> a folder ``transformers`` loads offline:
  ``LlamaForCausalLM`` for classic models (:mod:`.classic`), remote code for T-Free (:mod:`.tfree`,
  ``remote_code/``), with a model card (:mod:`.model_card`).
* :mod:`.llama_names`: this model's tensors <-> Llama's (names, fused splits, rotary order).
* :mod:`.import_llama`, :mod:`.import_reference` (``tools/import_checkpoint.py``): HF Llama folders and
  T-Free reference checkpoints -> this project's checkpoints.
* :mod:`.lm_eval_model`: the ``tfree`` model of lm-evaluation-harness.
"""
