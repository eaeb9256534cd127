"""toklab metrics on hand-made cases (values computed by hand in the comments)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from megatron_tfree.toklab.metrics import (Tally, near_duplicate_share, renyi_efficiency, shannon_efficiency, summary,
                                           tfree_collisions, unused_share)


def test_four_token_toy_efficiencies():
    counts = np.array([4, 2, 1, 1])  # p = 1/2, 1/4, 1/8, 1/8 over V = 4 (log2 V = 2)
    # Renyi a=2.5: log2(0.176777 + 0.031250 + 2 * 0.005524) / ((1 - 2.5) * 2) = log2(0.219075) / -3
    by_hand = math.log2(0.5**2.5 + 0.25**2.5 + 2 * 0.125**2.5) / (-1.5 * 2)
    assert renyi_efficiency(counts, 4) == pytest.approx(by_hand) == pytest.approx(0.730167, abs=1e-6)
    # Shannon: (0.5*1 + 0.25*2 + 2*0.125*3) / 2 = 1.75 / 2
    assert shannon_efficiency(counts, 4) == pytest.approx(0.875)
    assert renyi_efficiency(counts, 4, order=1.0) == pytest.approx(0.875)
    assert renyi_efficiency(np.array([3, 3, 3, 3]), 4) == pytest.approx(1.0)  # uniform: fully efficient
    # a vocabulary of 8 with half unused: the same distribution is less efficient (log2 V = 3)
    padded = np.array([4, 2, 1, 1, 0, 0, 0, 0])
    assert shannon_efficiency(padded, 8) == pytest.approx(1.75 / 3)
    assert unused_share(padded, 8) == 0.5


def test_near_duplicates_up_to_case_and_leading_space():
    tokens = ["the", " the", "The", " The", "a", "of", " ", "\n", b"\xe4", b" \xe4", b"\xc3\xa4", " \u00e4"]
    # groups: the x4 -> 3; a, of, "\n" alone; " " is spaces only; bytes \xe4 x2 -> 1; "ä" and " ä" -> 1
    assert near_duplicate_share(tokens, 20) == pytest.approx(5 / 20)


def test_summary_of_a_tally():
    t = Tally(words=4, bytes=20, chars=18, units=8, id_counts=np.array([4, 2, 1, 1]))
    out = summary(t, 4, base_units=10)
    assert (out["fertility"], out["bytes_per_token"], out["chars_per_token"], out["nsl"]) == (2.0, 2.5, 2.25, 0.8)
    assert out["unused_share"] == 0.0 and out["shannon_efficiency"] == pytest.approx(0.875)


def test_tfree_collisions_grow_as_the_vocabulary_shrinks():
    from megatron_tfree.tokenizer import TrigramTokenizer

    words = Counter({w: 10 - i for i, w in enumerate(["cat", "cats", "dog", "dogs", "bird", "fish", "tree", "house"])})
    roomy = tfree_collisions(TrigramTokenizer(vocab_size=1 << 16, vocab_population=8), words, threshold=0.9)
    assert roomy == {"identical_id_sets": 0.0, "overlapping_pairs": 0.0, "words_checked": 8}
    cramped = tfree_collisions(TrigramTokenizer(vocab_size=2, vocab_population=1), words, threshold=0.9)
    # two ids, one per trigram: every word's id set is {0}, {1} or {0, 1}: 8 words share at most 3 sets
    assert cramped["identical_id_sets"] >= 5 / 8 and cramped["overlapping_pairs"] > 0
