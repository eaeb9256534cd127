"""Multiple-round training (Tang et al. 2024, arXiv 2402.02791): each round trains on batches sampled
by the previous round's losses.

A round, with the checkpoint ``CKPT`` of the previous one frozen:

1. *score* (:mod:`.score`): one loss per training batch over an epoch, a *batch* being a global batch
   of the trainer (``B`` consecutive positions of its sample order), distributed over processes,
   resumable, written to a scores directory (:mod:`megatron_tfree.data.round_index`)::

       python -m megatron_tfree.multiround score --checkpoint CKPT --out INDEX_DIR [--batches N]

2. *sample* (:mod:`.sample`): ``p_i = softmax(l_i / T)``, ``N0`` batches drawn without replacement
   (seeded); their sample ids, flattened, are the *sample index* of the next round::

       python -m megatron_tfree.multiround sample --scores INDEX_DIR --temperature T --batches N0 \\
           --seed S --out round2.npy

3. *train* on it: ``data.sample_index=round2.npy`` makes the trainer read exactly those ids, in
   order, repeated (:class:`megatron_tfree.data.sampler.IndexSampler`; resumable, sharded over the
   data-parallel ranks like the normal order), e.g. with ``training.init_from=CKPT``.

Importing this package is light (numpy, the config); :mod:`.score` brings in torch and the model.
"""

from ..data.round_index import data_fingerprint, read_sample_index, read_scores, write_sample_index
from .sample import draw_batches, make_sample_index, probabilities

__all__ = ["data_fingerprint", "draw_batches", "make_sample_index", "probabilities", "read_sample_index",
           "read_scores", "write_sample_index"]
