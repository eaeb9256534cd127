"""The streaming reader on a DeepSpeed checkpoint it did not write: ZeRO-3 partitions over DP=2 under TP=2
give exactly the full fp32 weights the training ranks held (gathered through DeepSpeed's own APIs at
the last step); broken checkpoints fail with errors that name the file or tensor. The (TP=2, PP=2)
ZeRO-0 case (pipeline layer files, TP shards) is in tests/training/test_reshard.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from distributed import run_distributed
from megatron_tfree.checkpoint import CheckpointReader

STEPS = 2


def _sections(tp, pp, zero):
    return dict(model={"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2,
                       "mlp_factor": 2.68},
                training={"train_iterations": STEPS, "micro_batch_size": 1, "global_batch_size": 4,
                          "eval_iterations": 0},
                parallel={"tensor": tp, "pipe": pp, "zero_stage": zero})


def _train_and_gather(rank, world, cfg):
    """Train; at the last step every rank gathers the full fp32 weights (collective); rank 0 returns them."""
    from megatron_tfree.checkpoint.names import named_model_params
    from megatron_tfree.parallel.init import full_weight
    from megatron_tfree.training import train
    from megatron_tfree.training.deepspeed_state import local_value

    full = {}

    def hook(step, engine, record):
        if step == STEPS:
            for name, p in named_model_params(engine.module):
                full[name] = full_weight(p, local_value(p, engine.basic_optimizer, None)).numpy().copy()

    train(cfg, on_step=hook)
    return full


@pytest.fixture(scope="module", params=[(2, 1, 2, 3)], ids=["tp2-dp2-zero3"])
def trained(request, cfg_factory, tmp_path_factory):
    tp, pp, dp, zero = request.param
    out = tmp_path_factory.mktemp("reader")
    cfg = cfg_factory(out, "run", **_sections(tp, pp, zero))
    parts = run_distributed(_train_and_gather, world=tp * pp * dp, args=(cfg,), timeout=240)
    full = {}
    for part in parts:  # a pipeline stage's ranks hold that stage's tensors
        full.update({k: torch.from_numpy(v) for k, v in part.items()})
    return Path(cfg.training.save_dir), full


@pytest.mark.distributed
def test_reader_gives_the_full_weights(trained):
    run_dir, full = trained
    reader = CheckpointReader(run_dir)
    got = reader.state_dict()
    assert list(got) == list(reader.specs) and sorted(got) == sorted(full)
    for name, tensor in full.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor), name
    layers = [index for index, _ in reader.layers()]
    assert layers == list(range(reader.cfg.model.num_layers + 2))  # embedding, blocks, output: in order


@pytest.mark.distributed
def test_broken_checkpoints_name_the_problem(trained, tmp_path):
    run_dir, _ = trained
    tag = CheckpointReader(run_dir).tag_dir
    broken = tmp_path / "broken"
    shutil.copytree(tag, broken)
    victim = sorted(broken.glob("zero_pp_rank_1_*_optim_states.pt"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        CheckpointReader(broken).state_dict()
    shutil.copy2(tag / victim.name, victim)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=f"{victim.name}: cannot be read with torch.load"):
        CheckpointReader(broken).state_dict()
    shutil.copy2(tag / victim.name, victim)
    cfg = yaml.safe_load((broken / "config.yaml").read_text())
    cfg["model"]["num_kv_heads"] = 4  # the config no longer fits the weights
    (broken / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="blocks.0.attention.qkv.weight"):
        CheckpointReader(broken).state_dict()
