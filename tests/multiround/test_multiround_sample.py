"""Sampling the next round: p = softmax(l / T), draws without replacement, checked statistically; the
sample index file and its sidecar."""

import json

import numpy as np
import pytest
from scipy.special import chdtrc

from megatron_tfree.config import ConfigError
from megatron_tfree.data.round_index import (INDEX_FORMAT, SCORES_FORMAT, read_sample_index, save_json, save_npy,
                                             sidecar_path)
from megatron_tfree.multiround.sample import draw_batches, effective_batches, make_sample_index, probabilities

LOSSES = np.array([1.0, 1.3, 0.7, 2.0, 1.5])
ALPHA = 1e-3  # the tests are seeded (deterministic); this is how unlikely a correct sampler fails them
DRAWS = 8000


def chi_square_pvalue(observed, expected):
    """P(chi2 >= the statistic) with len - 1 degrees of freedom (Pearson's test; every expected count >= 5)."""
    observed, expected = np.asarray(observed, dtype=float), np.asarray(expected, dtype=float)
    assert expected.min() >= 5 and observed.sum() == pytest.approx(expected.sum())
    return chdtrc(len(observed) - 1, ((observed - expected) ** 2 / expected).sum())


def test_probabilities_are_softmax_of_loss_over_temperature():
    for t in (0.3, 1.0, 4.0):
        z = np.exp(LOSSES / t)
        np.testing.assert_allclose(probabilities(LOSSES, t), z / z.sum(), rtol=1e-12)
    np.testing.assert_allclose(probabilities(LOSSES + 1000.0, 0.5), probabilities(LOSSES, 0.5), rtol=1e-9)  # stable
    np.testing.assert_allclose(probabilities(LOSSES, 1e9), np.full(5, 0.2), rtol=1e-6)
    p = probabilities(LOSSES, 1e-4)
    assert p.argmax() == 3 and p[3] == pytest.approx(1.0)
    assert effective_batches(np.full(8, 1 / 8)) == pytest.approx(8.0)


def _frequencies(losses, t, num, seeds):
    return [tuple(draw_batches(losses, t, num, seed).tolist()) for seed in seeds]


def test_single_draws_follow_the_softmax():
    t = 0.5
    draws = _frequencies(LOSSES, t, 1, range(DRAWS))
    counts = np.bincount([d[0] for d in draws], minlength=5)
    expected = probabilities(LOSSES, t) * len(draws)
    assert chi_square_pvalue(counts, expected) > ALPHA, (counts, expected)


def test_ordered_pairs_follow_successive_sampling_without_replacement():
    losses, t = LOSSES[:4], 0.4
    p = probabilities(losses, t)
    draws = _frequencies(losses, t, 2, range(DRAWS))
    assert all(a != b for a, b in draws)  # never the same batch twice
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    expected = np.array([p[i] * p[j] / (1 - p[i]) for i, j in pairs]) * len(draws)  # P(first i, then j)
    observed = np.array([sum(1 for d in draws if d == pair) for pair in pairs])
    assert chi_square_pvalue(observed, expected) > ALPHA, (observed, expected)


def test_large_temperature_is_uniform_small_picks_the_highest_losses():
    draws = _frequencies(LOSSES, 1e6, 1, range(DRAWS))
    counts = np.bincount([d[0] for d in draws], minlength=5)
    assert chi_square_pvalue(counts, np.full(5, DRAWS / 5)) > ALPHA, counts
    losses = np.random.default_rng(0).normal(2.0, 0.3, size=50)  # distinct
    top = np.argsort(-losses)[:4].tolist()
    for seed in range(20):  # where p underflows to 0 for all but one batch: still 4 distinct, the top 4 in order
        assert draw_batches(losses, 1e-6, 4, seed).tolist() == top


def test_draws_are_distinct_seeded_and_deterministic():
    losses = np.random.default_rng(1).normal(size=200)
    a = draw_batches(losses, 1.0, 200, seed=7)
    assert sorted(a.tolist()) == list(range(200))  # all of them: a permutation
    b = draw_batches(losses, 1.0, 60, seed=7)
    assert len(set(b.tolist())) == 60
    assert np.array_equal(b, draw_batches(losses, 1.0, 60, seed=7))
    assert np.array_equal(b, a[:60])  # a prefix of the full draw: the same keys
    assert not np.array_equal(b, draw_batches(losses, 1.0, 60, seed=8))


@pytest.mark.parametrize("args, match", [
    ((LOSSES, 0.0, 1, 0), "temperature"), ((LOSSES, float("inf"), 1, 0), "temperature"),
    ((LOSSES, 1.0, 0, 0), "batches"), ((LOSSES, 1.0, 6, 0), "batches"), ((LOSSES, 1.0, 1, -1), "seed"),
    ((np.array([1.0, np.nan]), 1.0, 1, 0), "batch 1 has a non-finite loss"),
    ((np.array([1e300, 1.0]), 1e-300, 1, 0), "too small"),
])
def test_bad_arguments_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        draw_batches(*args)


# -- the sample index file ------------------------------------------------------------------------


def _fake_scores(directory, losses, batch_size, data=None):
    """A scores directory as `score` writes it (batches hold ids 100*k + j, easy to recognise)."""
    n = len(losses)
    batches = np.array([[100 * k + j for j in range(batch_size)] for k in range(n)], dtype=np.int64)
    directory.mkdir(parents=True, exist_ok=True)
    save_npy(directory / "scores.npy", np.asarray(losses, dtype=np.float64))
    save_npy(directory / "batches.npy", batches)
    save_json(directory / "scores.json", {"format": SCORES_FORMAT, "version": 1, "key": "k", "num_batches": n,
                                          "batch_size": batch_size, "data": data or {"num_samples": 100 * n}})
    return batches


@pytest.mark.parametrize("order", ["shuffle", "draw"])
def test_sample_index_holds_the_chosen_batches(tmp_path, order):
    losses = np.linspace(0.5, 1.5, 12)
    batches = _fake_scores(tmp_path / "scores", losses, 3)
    path, info = make_sample_index(tmp_path / "scores", 0.3, 5, 11, tmp_path / "round2.npy", order=order)
    ids = np.load(path, allow_pickle=False)
    chosen = info["batches"]
    assert ids.dtype == np.int64 and ids.tolist() == batches[chosen].reshape(-1).tolist()
    assert info["draw_order"] == draw_batches(losses, 0.3, 5, 11).tolist()
    assert sorted(chosen) == sorted(info["draw_order"])
    if order == "draw":
        assert chosen == info["draw_order"]
    side = json.loads(sidecar_path(path).read_text())
    assert side["format"] == INDEX_FORMAT and side["num_ids"] == 15 and side["temperature"] == 0.3
    assert side["batch_size"] == 3 and side["seed"] == 11 and side["order"] == order
    assert read_sample_index(path, 1200).tolist() == ids.tolist()
    again, _ = make_sample_index(tmp_path / "scores", 0.3, 5, 11, tmp_path / "again.npy", order=order)
    assert np.array_equal(np.load(again), ids)  # seeded: the same index


def test_shuffled_order_is_not_the_draw_order_in_general(tmp_path):
    _fake_scores(tmp_path / "scores", np.linspace(0.5, 1.5, 40), 2)
    _, info = make_sample_index(tmp_path / "scores", 0.2, 20, 3, tmp_path / "r.npy")
    assert sorted(info["batches"]) == sorted(info["draw_order"]) and info["batches"] != info["draw_order"]


def test_read_sample_index_checks_ids_sidecar_and_data(tmp_path):
    _fake_scores(tmp_path / "scores", [1.0, 2.0, 3.0], 2, data={"seq_len": 16, "num_samples": 300})
    path, _ = make_sample_index(tmp_path / "scores", 1.0, 2, 0, tmp_path / "r.npy")
    with pytest.raises(ConfigError, match=r"data.sample_index = .*r.npy.*: sample id 20[01] \(at position \d"):
        read_sample_index(path, 150)  # ids up to 201 in a set of 150 samples
    with pytest.raises(ConfigError, match=r"other training data.*\n  data.seq_len: 16 there, 32 here"):
        read_sample_index(path, 300, {"seq_len": 32, "num_samples": 300})
    with pytest.raises(FileNotFoundError, match=r"data.sample_index = .*missing.npy"):
        read_sample_index(tmp_path / "missing.npy", 300)
    save_npy(path, np.array([0, 1, 2]))  # the ids changed under the sidecar
    with pytest.raises(ConfigError, match="describes another index"):
        read_sample_index(path, 300)
    sidecar_path(path).unlink()  # a hand-made index: only its ids are checked
    assert read_sample_index(path, 300).tolist() == [0, 1, 2]
    for bad in (np.zeros((2, 2), dtype=np.int64), np.array([0.5]), np.array([], dtype=np.int64)):
        save_npy(path, bad)
        with pytest.raises(ConfigError, match="data.sample_index"):
            read_sample_index(path, 300)
