"""Scoring an epoch with a frozen checkpoint: the batches are the trainer's, the losses those of a direct
computation; interrupted and resumed (also across process counts) equals uninterrupted; the CLI."""

import json

import numpy as np
import pytest
import torch

from distributed import run_distributed
from megatron_tfree.checkpoint.reader import CheckpointReader
from megatron_tfree.data.dataset import build_dataset, collate
from megatron_tfree.data.sampler import ResumableSampler
from megatron_tfree.multiround.__main__ import main
from megatron_tfree.data.round_index import read_scores
from megatron_tfree.multiround.score import score_checkpoint


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(cfg_factory, tmp_path_factory):
    from megatron_tfree.training.loop import train

    cfg = cfg_factory(tmp_path_factory.mktemp("score"), "frozen",
                      training={"train_iterations": 2, "eval_iterations": 0})
    train(cfg)
    return cfg.training.save_dir


def test_scores_are_the_trainers_batches_and_their_direct_loss(ckpt, tmp_path):
    r = score_checkpoint(ckpt, tmp_path / "s", batch_size=4, num_batches=5)
    assert r.complete and r.num_batches == 5 and r.batch_size == 4 and r.scored_here == 5
    meta, losses, batches = read_scores(tmp_path / "s")
    reader = CheckpointReader(ckpt)
    ds = build_dataset(reader.cfg, reader.tokenizer, "train", progress=False)
    # batch k = positions 4k..4k+3 of the trainer's global order (data.seed, epoch 0)
    order = ResumableSampler(len(ds), seed=reader.cfg.data.seed).global_order(0, 20)
    assert batches.tolist() == order.reshape(5, 4).tolist()
    assert meta["batch_size"] == 4 and meta["micro_batch_size"] == 2 and meta["epoch"] == 0
    assert meta["data"]["num_samples"] == len(ds) and meta["checkpoint_step"] == 2
    assert not (tmp_path / "s" / "parts").exists()
    model = reader.load_model()
    with torch.no_grad():
        for k in (0, 3):
            micro = [float(model.loss(collate([ds[int(i)] for i in batches[k, j:j + 2]]))) for j in (0, 2)]
            assert losses[k] == pytest.approx(np.mean(micro), rel=1e-6)
            whole = float(model.loss(collate([ds[int(i)] for i in batches[k]])))  # T-Free: = the whole batch's loss
            assert losses[k] == pytest.approx(whole, rel=1e-5)


def test_default_batch_is_the_checkpoints_global_batch(ckpt, tmp_path):
    r = score_checkpoint(ckpt, tmp_path / "s", num_batches=2)
    assert r.batch_size == 2  # micro_batch_size 2 * accumulation 1 * one data-parallel rank


def test_interrupted_and_resumed_equals_uninterrupted(ckpt, tmp_path):
    assert score_checkpoint(ckpt, tmp_path / "whole", batch_size=2, num_batches=7).complete
    part = score_checkpoint(ckpt, tmp_path / "resumed", batch_size=2, num_batches=7, flush_every=1, stop_after=3)
    assert not part.complete and part.scored_here == 3
    assert (tmp_path / "resumed" / "parts" / "rank00000.npz").is_file()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        read_scores(tmp_path / "resumed")
    rest = score_checkpoint(ckpt, tmp_path / "resumed", batch_size=2, num_batches=7)
    assert rest.complete and rest.scored_here == 4
    a, b = read_scores(tmp_path / "whole"), read_scores(tmp_path / "resumed")
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2]) and a[0]["key"] == b[0]["key"]
    again = score_checkpoint(ckpt, tmp_path / "resumed", batch_size=2, num_batches=7)
    assert again.already_done and again.scored_here == 0
    with pytest.raises(FileExistsError, match="another job.*batch_size: 2 there, 4 now"):
        score_checkpoint(ckpt, tmp_path / "resumed", batch_size=4, num_batches=3)
    score_checkpoint(ckpt, tmp_path / "other", batch_size=2, num_batches=7, stop_after=1)
    with pytest.raises(FileExistsError, match="belongs to another scoring job"):
        score_checkpoint(ckpt, tmp_path / "other", batch_size=2, num_batches=6)


def _score_rank(rank, world, ckpt, out, kwargs):
    r = score_checkpoint(ckpt, out, **kwargs)
    return r.complete, r.scored_here


@pytest.mark.distributed
def test_two_ranks_finish_a_single_process_start(ckpt, tmp_path):
    kwargs = {"batch_size": 2, "num_batches": 9, "flush_every": 1}
    score_checkpoint(ckpt, tmp_path / "whole", **kwargs)
    score_checkpoint(ckpt, tmp_path / "mixed", stop_after=2, **kwargs)  # one process scores batches 0, 1 ...
    results = run_distributed(_score_rank, world=2, args=(ckpt, str(tmp_path / "mixed"), kwargs))
    assert results == [(True, 4), (True, 3)]  # ... two share the other 7 (2, 4, 6, 8 | 3, 5, 7) and finish
    a, b = read_scores(tmp_path / "whole"), read_scores(tmp_path / "mixed")
    np.testing.assert_allclose(b[1], a[1], rtol=1e-6)
    assert np.array_equal(a[2], b[2]) and b[0]["world_size"] == 2


def test_cli_score_then_sample(ckpt, tmp_path, capsys):
    scores, index = tmp_path / "scores", tmp_path / "round2.npy"
    assert main(["score", "--checkpoint", str(ckpt), "--out", str(scores), "--batches", "6", "--batch-size", "2",
                 "training.micro_batch_size=1"]) == 0
    assert "scored 6 batches of 2 samples" in capsys.readouterr().out
    meta, _, batches = read_scores(scores)
    assert meta["micro_batch_size"] == 1
    assert main(["sample", "--scores", str(scores), "--temperature", "0.5", "--batches", "3", "--seed", "4",
                 "--out", str(index)]) == 0
    assert "data.sample_index=" in capsys.readouterr().out
    side = json.loads(index.with_suffix(".json").read_text())
    assert np.load(index).tolist() == batches[side["batches"]].reshape(-1).tolist()
    assert main(["sample", "--scores", str(scores), "--temperature", "0", "--batches", "3", "--out",
                 str(tmp_path / "x.npy")]) == 2
    assert "--temperature must be a finite number > 0" in capsys.readouterr().err
    assert main(["sample", "--scores", str(tmp_path / "nothing"), "--temperature", "1", "--batches", "3", "--out",
                 str(tmp_path / "x.npy")]) == 2
