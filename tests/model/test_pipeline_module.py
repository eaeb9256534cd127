"""GPTPipe: the pipeline stages hold the GPTModel's weights, and a 2-stage pipeline (DeepSpeed's
PipelineEngine, gloo) computes the single-process loss, for T-Free and classic models."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from megatron_tfree.config import ModelConfig
from megatron_tfree.data.batch import Batch
from megatron_tfree.model import GPTModel

VOCAB, B, S = 512, 2, 16


def tiny_model_cfg(**kw) -> ModelConfig:
    return ModelConfig(hidden_size=32, num_layers=3, num_attention_heads=4, init="normal", **kw)


def random_batch(kind: str, seed: int = 0) -> Batch:
    """A batch with two documents per row; T-Free rows hold 3 ids, classic rows one."""
    g = torch.Generator().manual_seed(seed)
    per = 3 if kind == "tfree" else 1
    offsets = torch.arange(B * S + 1) * per
    docs = (torch.arange(S) >= S // 2).long().expand(B, S).contiguous()
    pos = torch.cat([torch.arange(S // 2), torch.arange(S // 2)]).expand(B, S).contiguous()
    weights = torch.ones(B, S)
    weights[:, -1] = 0.0
    return Batch(input_offsets=offsets, input_ids=torch.randint(0, VOCAB, (B * S * per,), generator=g),
                 target_offsets=offsets.clone(), target_ids=torch.randint(0, VOCAB, (B * S * per,), generator=g),
                 position_ids=pos, document_ids=docs, loss_weights=weights)


def _two_stages(rank, world, kind, checkpointing):
    import deepspeed

    from megatron_tfree.model.pipe import GPTPipe, to_pipe
    from megatron_tfree.training.engine import init_distributed

    init_distributed()
    cfg = tiny_model_cfg(activation_checkpointing=checkpointing)
    reference = GPTModel(cfg, kind, VOCAB, seed=7)
    pipe = GPTPipe(cfg, kind, VOCAB, seed=7, num_stages=2)
    layers = reference.layers()
    mine = pipe.stage_layers()
    same = all(
        torch.equal(t, layers[i].state_dict()[name])
        for i, module in mine.items() for name, t in module.state_dict().items()
    ) and all(set(m.state_dict()) == set(layers[i].state_dict()) for i, m in mine.items())

    batch = random_batch(kind)
    loss = reference.loss(batch)
    expected = float(loss.detach())
    loss.backward()
    with torch.no_grad():  # one plain SGD step on the reference
        for p in reference.parameters():
            p -= 0.5 * p.grad
    opt = torch.optim.SGD(pipe.parameters(), lr=0.5)
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "train_batch_size": B,
        "gradient_clipping": 0.0, "steps_per_print": 10**12})  # DeepSpeed's default clips at 1.0
    evaluated = float(engine.eval_batch(iter([to_pipe(batch)]), num_micro_batches=1))
    trained = float(engine.train_batch(iter([to_pipe(batch)])))  # forward + backward through 2 stages
    # after the step every stage layer equals the reference's updated layer (the gradients matched)
    updated = max(float((t - layers[i].state_dict()[name]).abs().max())
                  for i, module in mine.items() for name, t in module.state_dict().items())
    out = {"stage": pipe.stage_id, "layers": sorted(mine), "same_weights": same, "expected": expected,
           "eval": evaluated, "train": trained, "update_diff": updated}
    del engine, opt
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("kind,checkpointing", [("tfree", False), ("classic", True)])
def test_two_stage_pipeline_weights_and_loss(kind, checkpointing):
    results = run_distributed(_two_stages, world=2, args=(kind, checkpointing))
    assert [r["stage"] for r in results] == [0, 1]
    # 3 blocks over 2 stages: embedding + 1 or 2 blocks first, the rest + output last
    assert results[0]["layers"] + results[1]["layers"] == list(range(5))
    assert results[0]["layers"][0] == 0 and results[1]["layers"][-1] == 4
    for r in results:
        assert r["same_weights"]
        assert r["update_diff"] < 1e-6
        assert r["eval"] == pytest.approx(r["expected"], rel=1e-5)
        assert r["train"] == pytest.approx(r["expected"], rel=1e-5)


def test_labels_batch_and_to_pipe_round_trip():
    from megatron_tfree.model.pipe import labels_batch, to_pipe

    batch = random_batch("tfree")
    inputs, labels = to_pipe(batch)
    assert all(isinstance(t, torch.Tensor) for t in (*inputs, *labels))
    back = labels_batch(labels)
    assert torch.equal(back.target_ids, batch.target_ids) and back.shape == batch.shape
    model = GPTModel(tiny_model_cfg(), "tfree", VOCAB, seed=1)
    logits = model(batch)
    assert torch.equal(model.loss_from_logits(logits, back), model.loss_from_logits(logits, batch))
