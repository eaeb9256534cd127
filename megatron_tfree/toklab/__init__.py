"""Tokenizer lab: train, measure, prune, swap and learn tokenizers, and compare them with T-Free.

``python -m megatron_tfree.toklab VERB ...``:

* ``train`` (:mod:`.train`): byte-level BPE with pre-tokenisation presets (:mod:`.presets`) and a data
  mix by character budget per source (:mod:`.sources`); every trained tokenizer round-trips its corpus.
* ``report`` (:mod:`.report`): the metrics of :mod:`.metrics` (fertility, bytes/characters per token,
  NSL, Renyi and Shannon efficiency, near-duplicate and unused shares; T-Free: ids per word, id-set
  collisions) for several tokenizers (:mod:`.specs`) on several corpora: Markdown, JSON and plots.
* ``count`` / ``prune`` (:mod:`.count`, :mod:`.prune`): token frequencies of a corpus, and a smaller BPE
  keeping the frequent tokens (merges stay valid), with a checkpoint whose embedding and head rows are
  remapped to the new ids.
* ``swap`` (:mod:`.swap`): a new vocabulary for a trained model: Fast Vocabulary Transfer for classic
  models, and classic -> T-Free by a least-squares fit of the trigram embedding.
* ``soft`` (:mod:`.soft`): a small byte-level transformer that predicts a token's embedding row.
"""
