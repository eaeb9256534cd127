"""The trainer on a sample index (`data.sample_index`): exactly those ids, in order, repeated, resumable
and sharded over data-parallel ranks; the config key and the checks of the index against the data."""

import numpy as np
import pytest
import torch

from megatron_tfree.config import Config, ConfigError
from megatron_tfree.data.dataset import build_dataloader, collate
from megatron_tfree.data.sampler import IndexSampler
from megatron_tfree.data.sources import tokenizer_for_config
from megatron_tfree.data.round_index import data_fingerprint, write_sample_index

ORDER = np.array([7, 3, 3, 0, 9, 12, 5, 1, 8, 2, 11], dtype=np.int64)  # repeats allowed: it is an order


def take(it, n):
    return [next(it) for _ in range(n)]


def test_index_sampler_yields_the_ids_in_order_and_repeats():
    assert take(iter(IndexSampler(ORDER)), 25) == (ORDER.tolist() * 3)[:25]
    assert IndexSampler(ORDER).global_order(9, 14).tolist() == [2, 11, 7, 3, 3]
    finite = IndexSampler(ORDER, num_epochs=2)
    assert list(finite) == ORDER.tolist() * 2 and len(finite) == 22


@pytest.mark.parametrize("consumed", [0, 1, 4, 10, 11, 17])
def test_index_sampler_resume_is_the_tail_and_shards_cover_each_position_once(consumed):
    w, k = 3, 12
    whole = take(iter(IndexSampler(ORDER)), consumed + w * k + w)
    shards = [take(iter(IndexSampler(ORDER, r, w, consumed)), k) for r in range(w)]
    for r in range(w):  # rank r: the positions p >= consumed with p % w == r of the uninterrupted order
        assert shards[r] == [whole[p] for p in range(consumed, len(whole)) if p % w == r][:k]
    # together: the w * k positions after the resume point, each once
    assert sorted(sum(shards, [])) == sorted(whole[consumed:consumed + w * k])


def test_index_sampler_errors():
    with pytest.raises(ValueError, match="empty"):
        IndexSampler(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        IndexSampler(np.array([0.5]))
    with pytest.raises(ValueError, match="dp_rank"):
        IndexSampler(ORDER, dp_rank=2, dp_world=2)


def test_config_key_defaults_empty_and_must_name_a_npy_file():
    assert Config().data.sample_index == ""
    assert Config.from_dict({"data": {"sample_index": "r2.npy"}}).data.sample_index == "r2.npy"
    with pytest.raises(ConfigError, match=r"data\.sample_index must name a \.npy"):
        Config.from_dict({"data": {"sample_index": "r2.txt"}})


# -- the training dataloader ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(cfg_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("sampler")
    cfg = cfg_factory(out)
    tok = tokenizer_for_config(cfg)
    plain = build_dataloader(cfg, tok, progress=False)
    return cfg, tok, plain.dataset, out


def _with_index(cfg, path, **training):
    data = cfg.to_dict()
    data["data"]["sample_index"] = str(path)
    data["training"].update(training)
    return Config.from_dict(data)


def test_dataloader_reads_exactly_the_index(setup):
    cfg, tok, ds, out = setup
    n = len(ds)
    ids = np.array([n - 1, 0, 5, 5, 17, 2, 40, 3], dtype=np.int64)
    path = write_sample_index(out / "idx.npy", ids, {"data": data_fingerprint(cfg, tok, n)})
    icfg = _with_index(cfg, path)
    loader = build_dataloader(icfg, tok, progress=False)
    assert isinstance(loader.sampler, IndexSampler)
    got = [b for _, b in zip(range(5), loader)]  # 10 samples: the index, then its start again
    for k, b in enumerate(got):
        want = collate([ds[int(i)] for i in (ids.tolist() * 2)[2 * k: 2 * k + 2]])
        assert torch.equal(b.input_ids, want.input_ids) and torch.equal(b.target_ids, want.target_ids)
    resumed = build_dataloader(icfg, tok, consumed_samples=6, progress=False)
    assert torch.equal(next(iter(resumed)).input_ids, got[3].input_ids)
    rank1 = build_dataloader(icfg, tok, dp_rank=1, dp_world=2, progress=False)  # positions 1, 3 | 5, 7
    assert torch.equal(next(iter(rank1)).input_ids, collate([ds[int(ids[1])], ds[int(ids[3])]]).input_ids)
    valid = build_dataloader(icfg, tok, split="valid", progress=False)  # the index is for training only
    assert not isinstance(valid.sampler, IndexSampler)


def test_dataloader_rejects_a_bad_index_naming_key_file_and_id(setup):
    cfg, tok, ds, out = setup
    n = len(ds)
    with pytest.raises(FileNotFoundError, match=r"data\.sample_index = .*nowhere\.npy"):
        build_dataloader(_with_index(cfg, out / "nowhere.npy"), tok, progress=False)
    bad = write_sample_index(out / "bad.npy", np.array([0, 1, n + 4]), {})
    with pytest.raises(ConfigError, match=rf"data\.sample_index = .*bad\.npy.*sample id {n + 4} \(at position 2"):
        build_dataloader(_with_index(cfg, bad), tok, progress=False)
    other = dict(data_fingerprint(cfg, tok, n), seq_len=32)
    path = write_sample_index(out / "other.npy", np.array([0, 1]), {"data": other})
    with pytest.raises(ConfigError, match=r"other training data.*\n  data\.seq_len: 32 there, 16 here"):
        build_dataloader(_with_index(cfg, path), tok, progress=False)
