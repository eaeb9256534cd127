"""One round of multiple-round training on a tiny run: train, score the epoch, sample N0 batches, train
round 2 from round 1's weights on the sample index (interrupted and resumed), and check that round 2
trained on exactly the chosen samples, batch by batch."""

from pathlib import Path

import numpy as np
import pytest

from megatron_tfree.data.dataset import PretrainingDataset
from megatron_tfree.multiround import make_sample_index, read_scores
from megatron_tfree.multiround.score import score_checkpoint
from megatron_tfree.training.loop import train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_one_round(cfg_factory, tmp_path, monkeypatch):
    batch = {"global_batch_size": 4, "eval_iterations": 0}  # micro-batches of 2, accumulation 2
    r1 = cfg_factory(tmp_path, "round1", training={"train_iterations": 3, **batch})
    train(r1)

    scored = score_checkpoint(r1.training.save_dir, tmp_path / "scores")  # the whole epoch
    meta, losses, batches = read_scores(tmp_path / "scores")
    assert scored.batch_size == meta["batch_size"] == 4  # round 1's global batch
    assert len(losses) == meta["data"]["num_samples"] // 4 and np.isfinite(losses).all()
    assert len(set(batches.reshape(-1).tolist())) == batches.size  # an epoch: no sample twice

    index, info = make_sample_index(tmp_path / "scores", temperature=0.01, num_batches=5, seed=3,
                                    out=tmp_path / "round2.npy")
    ids = np.load(index)
    assert ids.tolist() == batches[info["batches"]].reshape(-1).tolist() and len(ids) == 20

    r2 = cfg_factory(tmp_path, "round2", data={"sample_index": str(index)},
                     training={"train_iterations": 5, "init_from": r1.training.save_dir, **batch})
    train_prefix = Path(r2.data.prefix_paths[0])
    seen: list[int] = []
    per_step: dict[int, list[int]] = {}
    real = PretrainingDataset.__getitem__

    def logged(self, idx):
        if Path(self.aligned.prefix) == train_prefix:
            seen.append(int(idx))
        return real(self, idx)

    def on_step(step, engine, record):
        per_step[step] = seen[sum(len(v) for v in per_step.values()):]
        assert record["consumed_samples"] == 4 * step

    with monkeypatch.context() as m:
        m.setattr(PretrainingDataset, "__getitem__", logged)
        train(r2, stop_after=2, on_step=on_step)  # interrupted after step 2 ...
        assert seen == ids[:8].tolist()
        result = train(r2, on_step=on_step)  # ... and resumed at consumed_samples = 8
    assert result.step == 5 and all(np.isfinite(v) for v in result.losses.values())
    assert seen == ids.tolist()  # round 2 read exactly the index, in order, nothing else
    for step in range(1, 6):  # step k trained on the k-th chosen batch
        assert sorted(per_step[step]) == sorted(batches[info["batches"][step - 1]].tolist())
