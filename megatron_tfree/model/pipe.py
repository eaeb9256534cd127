"""Pipeline parallelism: the GPT model as a DeepSpeed :class:`PipelineModule`, built from the same layers.

    pipe = GPTPipe(cfg.model, cfg.tokenizer.kind, vocab_size, seed=cfg.training.seed,
                   topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp))
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=..., config=...)
    loss = engine.train_batch(iter(pipe_batches(loader)))   # (inputs, labels) per micro-batch

No second copy of the model: the pipeline's layers are the modules of :class:`GPTModel`
(:func:`build_embedding`, :class:`TransformerBlock`, :class:`OutputLayer`), each built under the
same ``seeded(seed, stage_index)`` as in :class:`GPTModel`, so a pipeline stage holds exactly the
weights of the matching layers of the non-pipeline model. Thin adapters (:class:`PipeEmbedding`,
:class:`PipeBlock`, :class:`PipeOutput`) keep the model's module in ``.layer`` and pass
``(hidden, position_ids, document_ids)`` between stages as a tuple of tensors; every block rebuilds
its attention mask from the ids (cheap next to attention itself).

Inputs and labels (:func:`to_pipe`): the first stage gets
``(input_offsets, input_ids, position_ids, document_ids)`` and the last stage the labels
``(target_offsets, target_ids, loss_weights)`` straight from the data iterator, so the variable
length CSR tensors never cross a stage boundary. :class:`PipeLoss` computes the loss with the
last stage's :class:`OutputLayer` (T-Free BCE or classic CE, whatever the head defines).

Partitioning balances the transformer blocks (``type:PipeBlock``); the embedding joins the first
stage and the output layer the last. ``model.activation_checkpointing`` checkpoints every block
(torch's non-reentrant checkpoint, as in :class:`GPTModel`).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

from ..config import ModelConfig
from ..data.batch import Batch
from .gpt import OutputLayer, build_stage, make_input_batch
from .transformer import build_attention_meta

PipeInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
PipeLabels = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Carry = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden [B, S, h], position_ids, document_ids


def to_pipe(batch: Batch) -> tuple[PipeInputs, PipeLabels]:
    """``(inputs, labels)`` of one micro-batch as the DeepSpeed pipeline engine consumes them."""
    inputs = (batch.input_offsets, batch.input_ids, batch.position_ids, batch.document_ids)
    labels = (batch.target_offsets, batch.target_ids, batch.loss_weights)
    return inputs, labels


def labels_batch(labels: PipeLabels) -> Batch:
    """A :class:`Batch` holding the targets of ``labels`` (the fields a head's ``loss`` reads)."""
    target_offsets, target_ids, loss_weights = labels
    empty = torch.zeros(0, dtype=torch.long, device=loss_weights.device)
    positions = torch.zeros(loss_weights.shape, dtype=torch.long, device=loss_weights.device)
    return Batch(input_offsets=torch.zeros_like(target_offsets), input_ids=empty, target_offsets=target_offsets,
                 target_ids=target_ids, position_ids=positions, document_ids=positions,
                 loss_weights=loss_weights)


class PipeEmbedding(nn.Module):
    """Stage layer 0: the model's input embedding (``.layer``); CSR inputs -> ``(hidden, pos, doc)``."""

    def __init__(self, cfg: ModelConfig, kind: str, vocab_size: int, seed: int):
        super().__init__()
        self.layer = build_stage(cfg, kind, vocab_size, seed, 0)

    def forward(self, inputs: PipeInputs) -> Carry:
        offsets, ids, position_ids, document_ids = inputs
        hidden = self.layer(make_input_batch(offsets, ids, position_ids, document_ids))
        return hidden, position_ids, document_ids


class PipeBlock(nn.Module):
    """Transformer block ``index`` of the model (``.layer``, seeded as stage ``index + 1``)."""

    def __init__(self, cfg: ModelConfig, index: int, seed: int):
        super().__init__()
        self.attention_kind = cfg.attention
        self.layer = build_stage(cfg, "tfree", 0, seed, index + 1)  # blocks do not depend on kind/vocab

    def forward(self, inputs: Carry) -> Carry:
        hidden, position_ids, document_ids = inputs
        meta = build_attention_meta(position_ids, document_ids, hidden.dtype, self.attention_kind)
        return self.layer(hidden, meta), position_ids, document_ids


def _fused_training(output: OutputLayer) -> bool:
    """Training with a fused head + loss: the last stage hands the loss function the hidden states."""
    return output.training and output.fuses_loss


class PipeOutput(nn.Module):
    """The model's final norm + head (``.layer``, seeded as stage ``num_layers + 1``): logits; in training
    with a fused head + loss (``model.fused_head_loss``) the last block's hidden states, which
    :class:`PipeLoss` turns into the loss without forming the logits."""

    def __init__(self, cfg: ModelConfig, kind: str, vocab_size: int, seed: int):
        super().__init__()
        self.layer = build_stage(cfg, kind, vocab_size, seed, cfg.num_layers + 1)

    def forward(self, inputs: Carry) -> torch.Tensor:
        return inputs[0] if _fused_training(self.layer) else self.layer(inputs[0])


class PipeLoss:
    """``loss_fn(outputs, labels)`` of the last stage: the :class:`OutputLayer`'s own loss (of the logits,
    or fused from the hidden states, see :class:`PipeOutput`)."""

    def __init__(self) -> None:
        self.output: Optional[OutputLayer] = None  # bound by GPTPipe on the last stage

    def __call__(self, outputs: torch.Tensor, labels: PipeLabels) -> torch.Tensor:
        if self.output is None:
            raise RuntimeError("PipeLoss called on a stage without the output layer")
        if _fused_training(self.output):
            return self.output(outputs, labels_batch(labels))
        return self.output.loss(outputs, labels_batch(labels))


def layer_specs(cfg: ModelConfig, kind: str, vocab_size: int, seed: int) -> list[Any]:
    """DeepSpeed ``LayerSpec`` s: embedding, ``num_layers`` blocks, output (each built only on its stage)."""
    return [LayerSpec(PipeEmbedding, cfg, kind, vocab_size, seed),
            *[LayerSpec(PipeBlock, cfg, i, seed) for i in range(cfg.num_layers)],
            LayerSpec(PipeOutput, cfg, kind, vocab_size, seed)]


class GPTPipe(PipelineModule):
    """:class:`GPTModel` as a pipeline: ``PipelineModule`` over :func:`layer_specs`.

    Args:
        model_cfg, tokenizer_kind, vocab_size, seed: as for :class:`GPTModel` (same seed, same weights).
        topology: DeepSpeed's ``PipeModelDataParallelTopology`` (or ``num_stages`` for PP x DP only).
        partition_method: DeepSpeed's partitioning; the default balances the transformer blocks.
    """

    def __init__(self, model_cfg: ModelConfig, tokenizer_kind: str, vocab_size: int, seed: int,
                 topology: Any = None, num_stages: Optional[int] = None,
                 partition_method: str = "type:PipeBlock"):
        self.cfg, self.tokenizer_kind, self.vocab_size = model_cfg, tokenizer_kind, vocab_size
        loss = PipeLoss()
        super().__init__(
            layers=layer_specs(model_cfg, tokenizer_kind, vocab_size, seed),
            num_stages=num_stages, topology=topology, loss_fn=loss, partition_method=partition_method,
            activation_checkpoint_interval=1 if model_cfg.activation_checkpointing else 0,
            activation_checkpoint_func=functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False),
            checkpointable_layers=["PipeBlock"],
        )
        outputs = [f.layer for f in self.forward_funcs if isinstance(f, PipeOutput)]
        loss.output = outputs[0] if outputs else None

    @property
    def output(self) -> Optional[OutputLayer]:
        """This stage's :class:`OutputLayer` (None except on the last stage), as ``GPTModel.output``."""
        return self.loss_fn.output

    def stage_layers(self) -> dict[int, nn.Module]:
        """``{global layer index: model module}`` of this stage, index as in ``GPTModel.layers()``."""
        return {self._local_start + i: f.layer for i, f in enumerate(self.forward_funcs)}

    def loss_from_logits(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The output layer's loss (last stage only), as ``GPTModel.loss_from_logits``."""
        return self.loss_fn(logits, to_pipe(batch)[1])
