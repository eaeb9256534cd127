"""Deterministic, sharded, resumable sample order.

The *global order* is an endless stream of sample indices: epoch ``e`` is a permutation of
``range(num_samples)`` drawn from ``numpy.random.default_rng([seed, e])`` (or ``range(num_samples)``
itself when ``shuffle=False``), and the epochs are concatenated. Global position ``p`` therefore
holds sample ``perm(p // N)[p % N]``; the stream crosses epoch boundaries without dropping or
repeating anything.

Data-parallel rank ``r`` of ``w`` owns the global positions ``p`` with ``p % w == r`` (every w-th
index, disjoint across ranks, together covering the stream). ``consumed_samples`` counts global
positions already trained on (all ranks together: ``iterations * micro_batch * w`` for plain data
parallelism); resuming at ``consumed_samples = c`` yields exactly the positions ``p >= c`` of the
uninterrupted order, so the order after a restart is the tail of the order without one.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch.utils.data


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The sample order of one epoch (a permutation of ``range(num_samples)``), int64."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)])
    return rng.permutation(num_samples).astype(np.int64, copy=False)


class ResumableSampler(torch.utils.data.Sampler):
    """Yields this rank's sample indices of the global order, starting at ``consumed_samples``.

    Args:
        num_samples: size of the dataset (one epoch).
        seed: shuffling seed; the order is a pure function of ``(seed, epoch)``.
        dp_rank, dp_world: this data-parallel rank and the number of data-parallel ranks.
        consumed_samples: global positions already consumed (resume point).
        shuffle: permute each epoch (``False``: every epoch is ``0..N-1`` in order).
        num_epochs: stop after this many epochs of the global order (``None``: endless).
    """

    def __init__(self, num_samples: int, seed: int, dp_rank: int = 0, dp_world: int = 1,
                 consumed_samples: int = 0, shuffle: bool = True, num_epochs: Optional[int] = None):
        if num_samples <= 0:
            raise ValueError(f"ResumableSampler: the dataset is empty (num_samples={num_samples})")
        if dp_world <= 0 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"ResumableSampler: need 0 <= dp_rank < dp_world, got rank {dp_rank} of {dp_world}")
        if consumed_samples < 0:
            raise ValueError(f"ResumableSampler: consumed_samples must be >= 0, got {consumed_samples}")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"ResumableSampler: num_epochs must be > 0 or None, got {num_epochs}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.dp_rank = int(dp_rank)
        self.dp_world = int(dp_world)
        self.consumed_samples = int(consumed_samples)
        self.shuffle = shuffle
        self.num_epochs = num_epochs

    def _end(self) -> Optional[int]:
        return None if self.num_epochs is None else self.num_epochs * self.num_samples

    def __len__(self) -> int:
        """Indices this rank still yields (only for a finite ``num_epochs``)."""
        end = self._end()
        if end is None:
            raise TypeError("ResumableSampler with num_epochs=None is endless and has no length")
        first = self._first_position()
        return 0 if first >= end else (end - 1 - first) // self.dp_world + 1

    def _first_position(self) -> int:
        """The first global position >= consumed_samples that belongs to this rank."""
        c, w, r = self.consumed_samples, self.dp_world, self.dp_rank
        return c + ((r - c) % w)

    def global_order(self, start: int, stop: int) -> np.ndarray:
        """Sample indices at global positions ``start..stop-1`` (all ranks), for inspection and tests."""
        perms: dict[int, np.ndarray] = {}
        out = np.empty(max(stop - start, 0), dtype=np.int64)
        for k, p in enumerate(range(start, stop)):
            e, i = divmod(p, self.num_samples)
            if e not in perms:
                perms[e] = epoch_permutation(self.num_samples, self.seed, e, self.shuffle)
            out[k] = perms[e][i]
        return out

    def __iter__(self) -> Iterator[int]:
        n, w = self.num_samples, self.dp_world
        end = self._end()
        p = self._first_position()
        epoch, perm = -1, None
        while end is None or p < end:
            e, i = divmod(p, n)
            if e != epoch:
                epoch, perm = e, epoch_permutation(n, self.seed, e, self.shuffle)
            yield int(perm[i])
            p += w
