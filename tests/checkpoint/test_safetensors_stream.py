"""Safetensors written one tensor at a time: read back by safetensors itself, sharded with an index."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_tfree.checkpoint.safetensors_stream import (INDEX_FILE, Entry, SafetensorsWriter, parse_size,
                                                         plan_shards, read_weight_map, shard_names, write_index)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
            "c": torch.arange(6, dtype=torch.int32).reshape(2, 3), "d": torch.randn(4, 4, generator=g).half(),
            "e": torch.zeros(0, 3), "f": torch.tensor([True, False])}


def test_streamed_file_reads_back_exactly(tmp_path):
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, [Entry(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                           metadata={"format": "pt"}) as w:
        for n, t in tensors.items():
            w.write(n, t)
    back = load_file(str(path))
    assert sorted(back) == sorted(tensors)
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and torch.equal(back[n], t), n
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_writer_errors_name_the_tensor(tmp_path):
    entries = [Entry("x", torch.float32, (2,)), Entry("y", torch.float32, (3,))]
    with pytest.raises(ValueError, match="expected 'x'"):
        with SafetensorsWriter(tmp_path / "a.safetensors", entries) as w:
            w.write("y", torch.zeros(3))
    w = SafetensorsWriter(tmp_path / "b.safetensors", entries)
    with pytest.raises(ValueError, match=r"float32 \[2\], got 'x' torch.float32 \[3\]"):
        w.write("x", torch.zeros(3))
    w.write("x", torch.zeros(2))
    with pytest.raises(ValueError, match="1 tensors unwritten, e.g. \\['y'\\]"):
        w.close()


def test_shards_and_index(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    entries = [Entry(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    shards = plan_shards(entries, 900)
    assert [[e.name for e in s] for s in shards] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert plan_shards(entries, 10)[0] == [entries[0]]  # a tensor above the limit stands alone
    names = shard_names(len(shards))
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for group, name in zip(shards, names):
        with SafetensorsWriter(tmp_path / name, group) as w:
            for e in group:
                w.write(e.name, tensors[e.name])
    write_index(tmp_path, shards, names)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 2000 and index["weight_map"]["t3"] == names[1]
    assert read_weight_map(tmp_path) == {n: tmp_path / index["weight_map"][n] for n in tensors}
    (tmp_path / names[2]).unlink()
    with pytest.raises(FileNotFoundError, match="names shards that do not exist"):
        read_weight_map(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        read_weight_map(tmp_path / "nowhere")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("123") == 123 and parse_size(7) == 7 and parse_size("1.5kb") == 1500
    with pytest.raises(ValueError, match="5 gigs"):
        parse_size("5 gigs")
