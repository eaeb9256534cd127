"""The checkpoint format's small pieces: tag resolution (one rule for every entry point), atomic output
directories, the TP shard merge (inverse of the split), parameter specs from the model."""

from __future__ import annotations

import pytest
import torch

from megatron_tfree.checkpoint import atomic_output_dir, param_specs, resolve_tag_dir
from megatron_tfree.checkpoint.names import stage_index, stage_prefix
from megatron_tfree.config import ModelConfig
from megatron_tfree.model import GPTModel
from megatron_tfree.parallel.init import local_shard, merge_shards


def _tag(root, name="step_3"):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("{}\n")
    return d


def test_resolve_run_dir_tag_dir_and_errors(tmp_path):
    tag = _tag(tmp_path)
    (tmp_path / "latest").write_text("step_3\n")
    assert resolve_tag_dir(tmp_path) == tag and resolve_tag_dir(tag) == tag
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_tag_dir(tmp_path / "nowhere")
    (tmp_path / "latest").write_text("step_9")
    with pytest.raises(FileNotFoundError, match="names 'step_9'"):
        resolve_tag_dir(tmp_path)
    (tmp_path / "latest").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_tag_dir(tmp_path)
    half = tmp_path / "step_4"
    half.mkdir()
    (tmp_path / "latest").write_text("step_4")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_tag_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a save dir"):
        resolve_tag_dir(half)


def test_atomic_output_dir(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(FileExistsError, match="--force"):
        with atomic_output_dir(out, flag="--force"):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left, old output intact
    assert (out / "a.txt").read_text() == "1"
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("size,tp,stride", [(10, 2, 1), (11, 3, 1), (2 * 85, 2, 2), (2 * 683, 4, 2), (8, 4, 2)])
def test_merge_shards_inverts_the_split(size, tp, stride):
    full = torch.randn(size, 5)
    shards = [local_shard(full, 0, tp, r, stride) for r in range(tp)]
    assert torch.equal(merge_shards(shards, 0, stride), full)
    cols = [local_shard(full.t(), 1, tp, r, stride) for r in range(tp)]
    assert torch.equal(merge_shards(cols, 1, stride), full.t())
    with pytest.raises(ValueError, match="TP shard 0"):
        merge_shards([shards[0][:-1], *shards[1:]], 0, stride)


def test_param_specs_follow_the_model():
    cfg = ModelConfig(hidden_size=32, num_layers=3, num_attention_heads=4, num_kv_heads=2, mlp_factor=2.68)
    specs = param_specs(cfg, "tfree", 512)
    model = GPTModel(cfg, "tfree", 512, seed=0)
    assert list(specs) == list(model.state_dict())
    assert all(specs[n].shape == tuple(p.shape) for n, p in model.named_parameters())
    by = {n: (s.partition_dim, s.stride) for n, s in specs.items()}
    assert by["embedding.weight"] == (0, 1) and by["output.head.linear.weight"] == (0, 1)
    assert by["blocks.1.attention.qkv.weight"] == (0, 1) and by["blocks.1.attention.dense.weight"] == (1, 1)
    assert by["blocks.1.mlp.gate_up.weight"] == (0, 2) and by["blocks.1.mlp.down.weight"] == (1, 1)
    assert by["blocks.2.input_norm.weight"] == (None, 1) and by["output.norm.weight"] == (None, 1)
    for name in specs:
        assert name.startswith(stage_prefix(stage_index(name, 3), 3) + ".")
    with pytest.raises(ValueError, match="not a parameter name"):
        stage_index("blocks.3.x", 3)


def test_release_file_pages_only_touches_file_mappings(tmp_path):
    import sys

    from megatron_tfree.checkpoint.memory import release_file_pages

    anon = torch.arange(1 << 20, dtype=torch.float32)
    assert release_file_pages(anon) is False and torch.equal(anon, torch.arange(1 << 20, dtype=torch.float32))
    torch.save({"w": torch.arange(1 << 20, dtype=torch.float32)}, tmp_path / "w.pt")
    mapped = torch.load(tmp_path / "w.pt", mmap=True, weights_only=True)["w"]
    assert float(mapped.sum()) == float(anon.sum())  # pages read
    assert release_file_pages(mapped) is sys.platform.startswith("linux")
    assert torch.equal(mapped, anon)  # still valid: dropped pages are read again from the file
    mapped.mul_(5)  # a consumer editing in place keeps its edit (private copies are never discarded)
    release_file_pages(mapped)
    assert torch.equal(mapped, anon * 5)


def test_merged_safetensors_get_the_usual_file_mode(tmp_path):
    import os

    from safetensors.torch import save_file

    from megatron_tfree.checkpoint.consolidated import merge_parts

    save_file({"a": torch.zeros(2)}, str(tmp_path / "part0.model.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "part1.model.safetensors"))
    merge_parts(tmp_path, "model.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert oct((tmp_path / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~mask)  # not 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
