"""Parameter inheritance (after Tang et al. 2024, arXiv 2402.02791): a smaller model initialised from a
larger trained one, for T-Free and classic models, from checkpoints of any layout.

    python -m megatron_tfree.inherit --from runs/big --config configs/tiny.yaml model.num_layers=2 --out runs/small-init
    python -m megatron_tfree.train --config configs/tiny.yaml model.num_layers=2 training.init_from=runs/small-init

* :mod:`.shape`: what the small model keeps (:class:`~.shape.Selection`) and slicing the weights;
* :mod:`.importance`: layer selection (even, or by the loss increase when a block is skipped) and width
  selection (attention KV groups, SwiGLU channels, hidden dimensions) by L1, L2 or first-order Taylor;
* :mod:`.build`: the whole step, from a checkpoint to a weights-only checkpoint for ``training.init_from``.
"""
