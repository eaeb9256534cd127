"""Deterministic, sharded, resumable sample order.

The *global order* is an endless stream of sample indices: epoch ``e`` is a permutation of
``range(num_samples)`` drawn from ``numpy.random.default_rng([seed, e])`` (or ``range(num_samples)``
itself when ``shuffle=False``), and the epochs are concatenated. Global position ``p`` therefore
holds sample ``perm(p // N)[p % N]``; the stream crosses epoch boundaries without dropping or
repeating anything.

With a *sample index* (``data.sample_index``, a round of multiple-round training, see
:mod:`megatron_tfree.multiround`) the order is given instead: :class:`IndexSampler` repeats the
index's ids ``order[0..L-1]`` endlessly (position ``p`` holds ``order[p % L]``; an "epoch" is one pass
over the index, unshuffled: the index already is the order the round trains in).

Data-parallel rank ``r`` of ``w`` owns the global positions ``p`` with ``p % w == r`` (every w-th
index, disjoint across ranks, together covering the stream). ``consumed_samples`` counts global
positions already trained on (all ranks together: ``iterations * micro_batch * w`` for plain data
parallelism); resuming at ``consumed_samples = c`` yields exactly the positions ``p >= c`` of the
uninterrupted order, so the order after a restart is the tail of the order without one. Both
samplers share this position logic (:class:`_ShardedOrder`).
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


class _ShardedOrder(torch.utils.data.Sampler):
    """Positions of an endless stream of epochs of ``epoch_length`` ids, sharded over data-parallel
    ranks and resumable (module docstring); subclasses say what epoch ``e`` holds (:meth:`_epoch`)."""

    def __init__(self, epoch_length: int, dp_rank: int, dp_world: int, consumed_samples: int,
                 num_epochs: Optional[int]):
        name = type(self).__name__
        if epoch_length <= 0:
            raise ValueError(f"{name}: the dataset is empty (num_samples={epoch_length})")
        if dp_world <= 0 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"{name}: need 0 <= dp_rank < dp_world, got rank {dp_rank} of {dp_world}")
        if consumed_samples < 0:
            raise ValueError(f"{name}: consumed_samples must be >= 0, got {consumed_samples}")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"{name}: num_epochs must be > 0 or None, got {num_epochs}")
        self._epoch_length = int(epoch_length)
        self.dp_rank = int(dp_rank)
        self.dp_world = int(dp_world)
        self.consumed_samples = int(consumed_samples)
        self.num_epochs = num_epochs

    def _epoch(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def _end(self) -> Optional[int]:
        return None if self.num_epochs is None else self.num_epochs * self._epoch_length

    def __len__(self) -> int:
        """Indices this rank still yields (only for a finite ``num_epochs``)."""
        end = self._end()
        if end is None:
            raise TypeError(f"{type(self).__name__} with num_epochs=None is endless and has no length")
        first = self._first_position()
        return 0 if first >= end else (end - 1 - first) // self.dp_world + 1

    def _first_position(self) -> int:
        """The first global position >= consumed_samples that belongs to this rank."""
        c, w, r = self.consumed_samples, self.dp_world, self.dp_rank
        return c + ((r - c) % w)

    def global_order(self, start: int, stop: int) -> np.ndarray:
        """Sample indices at global positions ``start..stop-1`` (all ranks), for inspection and tests."""
        n = self._epoch_length
        perms: dict[int, np.ndarray] = {}
        out = np.empty(max(stop - start, 0), dtype=np.int64)
        for k, p in enumerate(range(start, stop)):
            e, i = divmod(p, n)
            if e not in perms:
                perms[e] = self._epoch(e)
            out[k] = perms[e][i]
        return out

    def __iter__(self) -> Iterator[int]:
        n, w = self._epoch_length, self.dp_world
        end = self._end()
        p = self._first_position()
        epoch, perm = -1, None
        while end is None or p < end:
            e, i = divmod(p, n)
            if e != epoch:
                epoch, perm = e, self._epoch(e)
            yield int(perm[i])
            p += w


class ResumableSampler(_ShardedOrder):
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
        super().__init__(num_samples, dp_rank, dp_world, consumed_samples, num_epochs)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle

    def _epoch(self, epoch: int) -> np.ndarray:
        return epoch_permutation(self.num_samples, self.seed, epoch, self.shuffle)


class IndexSampler(_ShardedOrder):
    """Yields this rank's share of a given global order: the ids of ``order`` (a sample index), repeated
    endlessly, starting at ``consumed_samples`` (module docstring).

    Args:
        order: 1-D sample ids in training order (validated by the caller against the dataset size;
            see :func:`megatron_tfree.data.round_index.read_sample_index`).
        dp_rank, dp_world, consumed_samples, num_epochs: as for :class:`ResumableSampler`; an epoch is
            one pass over ``order``.
    """

    def __init__(self, order: np.ndarray, dp_rank: int = 0, dp_world: int = 1, consumed_samples: int = 0,
                 num_epochs: Optional[int] = None):
        order = np.asarray(order)
        if order.ndim != 1 or (order.size and not np.issubdtype(order.dtype, np.integer)):
            raise ValueError(f"IndexSampler: order must be a 1-D array of integer sample ids, got "
                             f"{order.dtype} of shape {order.shape}")
        if order.size == 0:
            raise ValueError("IndexSampler: the sample index is empty")
        super().__init__(len(order), dp_rank, dp_world, consumed_samples, num_epochs)
        self.order = order.astype(np.int64, copy=False)

    def _epoch(self, epoch: int) -> np.ndarray:
        return self.order
