"""A new tokenizer for a trained model: Fast Vocabulary Transfer, and classic -> T-Free.

    rows, stats = fvt_rows(reader, new_hf_tokenizer)                  # classic -> classic (FVT)
    rows, fit = tfree_rows(reader, TrigramTokenizer(8192, 10), texts)   # classic -> T-Free
    write_checkpoint(reader, out, tokenizer, rows, ...)                 # :mod:`.rewrite`

**FVT** (Gee et al. 2022): a new token that is in the old vocabulary copies its embedding and head
rows; any other is cut into old tokens by the old tokenizer and gets the mean of their rows. Byte-level
tokenizers are compared and cut in their byte-symbol spelling (so tokens that are not whole UTF-8
characters transfer too); other tokenizers through the token's text. ``method="random"`` is the
ablation: the tokens not in the old vocabulary get random rows (normal, the old rows' std) instead.

**Classic -> T-Free**: a T-Free word's input is the sum of its trigram ids' rows ``E[ids(w)]``. Over the
most frequent words of a corpus (their counts as weights ``log(1 + n)``), the embedding ``X [v, h]`` is
fitted by least squares so that each word's bag ``sum E[ids(w)]`` approximates the classic model's
mean embedding of the word's tokens; the head so that the mean of a word's head rows approximates the
classic head row of the word's first token (the classic model's score for the word starting next). A
word's classic spelling is its text, with a leading space when it starts with a letter or digit (the
way BPE sees words inside a sentence); marker words without text (``<|no_ws|>``) are left out. The fit
is ridge-regularised, ``min sum_w c_w |a_w X - y_w|^2 + lam |X|^2`` (a word's bag is a sum of dozens
of rows: pulling the rows towards zero rather than towards a random start keeps unseen words' bags
small), solved by diagonally preconditioned conjugate gradients on the normal equations with the
sparse word/id matrix (memory ~ words x ids per word, any v); ids that no fitted word uses keep the random initialisation ``X0``. The transformer
blocks and the final norm are copied unchanged. :class:`FitReport` gives the relative residual of
the fit and of ``X0`` on the fitted words and on held-out words.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import torch

from megatron_tfree.checkpoint import CheckpointReader
from megatron_tfree.checkpoint.names import EMBEDDING, HEAD

from .rewrite import vocab_rows
from .specs import byte_symbols


# ---------------------------------------------------------------------------------------- FVT
@dataclass
class TransferStats:
    copied: int = 0  # new tokens found in the old vocabulary
    averaged: int = 0  # cut into old tokens, mean of their rows
    random: int = 0  # random rows (method="random", or nothing to average)

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _byte_level(tokenizer: Any) -> bool:
    config = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    return "ByteLevel" in json.dumps(config.get("decoder") or {}) and all(
        s in vocab for s in byte_symbols().values())


def fvt_rows(reader: CheckpointReader, new: Any, method: str = "fvt", seed: int = 0) -> tuple[dict[str, torch.Tensor], TransferStats]:
    """The embedding and head rows of the new HF tokenizer ``new`` for the classic model of ``reader``."""
    if method not in ("fvt", "random"):
        raise ValueError(f"method must be 'fvt' or 'random', got {method!r}")
    if reader.kind != "classic":
        raise ValueError(f"{reader.tag_dir}: FVT transfers a classic model's rows; this is a {reader.kind} model "
                         f"(classic -> T-Free: --tfree)")
    old = reader.tokenizer.hf_tokenizer
    old_vocab = old.get_vocab(with_added_tokens=True)
    old_rows = vocab_rows(reader)
    V = new.get_vocab_size(with_added_tokens=True)
    symbol_space = _byte_level(old) and _byte_level(new)
    gen = torch.Generator().manual_seed(seed)
    out = {name: torch.empty(V, t.shape[1]) for name, t in old_rows.items()}
    stats = TransferStats()
    specials = {a.content for a in new.get_added_tokens_decoder().values()}
    for token, i in sorted(new.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]):
        if token in old_vocab:
            for name, rows in old_rows.items():
                out[name][i] = rows[old_vocab[token]]
            stats.copied += 1
            continue
        parts: list[int] = []
        if method == "fvt":
            if symbol_space and token not in specials:
                parts = [t.id for t in old.model.tokenize(token)]
            else:
                parts = old.encode(token if token in specials else new.decode([i]), add_special_tokens=False).ids
        if parts:
            for name, rows in old_rows.items():
                out[name][i] = rows[parts].mean(0)
            stats.averaged += 1
        else:
            for name, rows in old_rows.items():
                out[name][i] = torch.randn(rows.shape[1], generator=gen) * rows.std()
            stats.random += 1
    return out, stats


# ---------------------------------------------------------------------------------------- classic -> T-Free
@dataclass
class FitReport:
    words: int  # fitted
    heldout_words: int
    ids: int  # v
    ridge: float
    iterations: dict[str, int] = field(default_factory=dict)
    unused_ids: dict[str, int] = field(default_factory=dict)  # ids no fitted word uses: random rows kept
    # relative residual |A X - Y| / |Y| (weighted) per tensor: of the fit, and of the random init X0
    residual: dict[str, float] = field(default_factory=dict)
    residual_init: dict[str, float] = field(default_factory=dict)
    heldout_residual: dict[str, float] = field(default_factory=dict)
    heldout_residual_init: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def classic_spelling(tfree: Any, word: str) -> str:
    """The text a classic tokenizer sees for a T-Free word inside a sentence (see the module docstring)."""
    text = tfree.decode([word])
    return " " + text if text[:1].isalnum() else text


def word_counts(tfree: Any, texts: Iterable[str]) -> Counter:
    counts: Counter = Counter()
    for text in texts:
        counts.update(tfree.encode(text).units)
    return counts


def _sparse(tfree: Any, words: list[str], mean: bool) -> torch.Tensor:
    """The [words, v] matrix of each word's ids (repeats counted; ``mean``: rows divided by their sum)."""
    ids = tfree.encode_units(words)
    lengths = np.diff(ids.offsets)
    rows = torch.from_numpy(np.repeat(np.arange(len(words)), lengths))
    values = torch.ones(len(rows), dtype=torch.float32)
    if mean:
        values /= torch.from_numpy(lengths[rows.numpy()]).float()
    index = torch.stack([rows, torch.from_numpy(ids.indices.astype(np.int64))])
    with warnings.catch_warnings():  # torch's notes on sparse invariant checks and on CSR being beta
        warnings.simplefilter("ignore", UserWarning)
        a = torch.sparse_coo_tensor(index, values, (len(words), tfree.vocab_size), check_invariants=True).coalesce()
        return a.to_sparse_csr()


def _residual(a: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    r = (a @ x - y) * w.sqrt()[:, None]
    return float(r.norm() / (y * w.sqrt()[:, None]).norm())


def _ridge_cg(a: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lam: float,
              max_iter: int = 1000, tol: float = 1e-4) -> tuple[torch.Tensor, int]:
    """``argmin_X sum_i w_i |a_i X - y_i|^2 + lam |X|^2`` by conjugate gradients on the normal equations
    from zero, preconditioned by their diagonal (ids occur in very different numbers of words), all
    columns at once with their own step sizes; stops when every column's residual is below ``tol`` of
    its right-hand side."""
    at = a.t().to_sparse_csr()
    rows = a.crow_indices()
    row_of = torch.repeat_interleave(torch.arange(a.shape[0]), rows[1:] - rows[:-1])
    diag = torch.zeros(a.shape[1], dtype=y.dtype).index_add_(0, a.col_indices(), a.values() ** 2 * w[row_of]) + lam
    inv = (1.0 / diag)[:, None]

    def op(x: torch.Tensor) -> torch.Tensor:
        return at @ (w[:, None] * (a @ x)) + lam * x

    b = at @ (w[:, None] * y)
    x = torch.zeros_like(b)
    r = b.clone()
    z = inv * r
    p = z.clone()
    rz = (r * z).sum(0)
    b_norm = b.norm(dim=0).clamp_min(1e-30)
    it = 0
    for it in range(1, max_iter + 1):
        q = op(p)
        alpha = rz / (p * q).sum(0).clamp_min(1e-30)
        x += alpha * p
        r -= alpha * q
        if bool((r.norm(dim=0) / b_norm).max() < tol):
            break
        z = inv * r
        rz_new = (r * z).sum(0)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, it


def tfree_rows(reader: CheckpointReader, tfree: Any, texts: Iterable[str], words: int = 20000,
               heldout: float = 0.1, ridge: float = 0.05, seed: int = 0,
               counts: Optional[Counter] = None) -> tuple[dict[str, torch.Tensor], FitReport, Counter]:
    """T-Free embedding and head rows fitted to the classic model of ``reader`` (see the module docstring)
    over the ``words`` most frequent words of ``texts`` (or of ``counts``), ``heldout`` of them held out
    to measure the fit; ``ridge``: ``lam`` relative to the mean squared entries per word (times the mean
    weight). Returns the rows,
    the report, and the corpus word counts."""
    if reader.kind != "classic":
        raise ValueError(f"{reader.tag_dir}: the source must be a classic model, this is a {reader.kind} model")
    classic = reader.tokenizer
    counts = counts if counts is not None else word_counts(tfree, texts)
    chosen, targets_emb, targets_head, weights = [], [], [], []
    old = vocab_rows(reader)
    E, H = old[EMBEDDING], old[HEAD]
    for word, n in counts.most_common():
        if len(chosen) == words:
            break
        spelling = classic_spelling(tfree, word)
        ids = classic.encode_ids(spelling) if spelling else []
        if len(ids) == 0:
            continue
        chosen.append(word)
        targets_emb.append(E[torch.as_tensor(ids, dtype=torch.long)].mean(0))
        targets_head.append(H[int(ids[0])])
        weights.append(math.log1p(n))
    if len(chosen) < 2:
        raise ValueError(f"only {len(chosen)} words to fit: give a larger corpus")
    order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed))
    n_hold = int(round(heldout * len(chosen))) if heldout > 0 else 0
    fit_idx, hold_idx = order[n_hold:], order[:n_hold]
    h = E.shape[1]
    std = float(reader.cfg.model.init_std) if reader.cfg.model.init == "normal" else math.sqrt(2.0 / (5 * h))
    gen = torch.Generator().manual_seed(seed + 1)
    x0 = {name: torch.randn(tfree.vocab_size, h, generator=gen) * std for name in (EMBEDDING, HEAD)}
    y_all = {EMBEDDING: torch.stack(targets_emb), HEAD: torch.stack(targets_head)}
    w_all = torch.tensor(weights)
    report = FitReport(len(fit_idx), len(hold_idx), tfree.vocab_size, ridge)
    rows = {}
    for name, mean in ((EMBEDDING, False), (HEAD, True)):
        a_fit = _sparse(tfree, [chosen[i] for i in fit_idx], mean)
        y, w = y_all[name][fit_idx], w_all[fit_idx]
        nnz_per_word = (a_fit.values() ** 2).sum() / a_fit.shape[0]
        lam = ridge * float(nnz_per_word) * float(w.mean())
        x, iters = _ridge_cg(a_fit, y, w, lam)
        unused = torch.from_numpy(np.bincount(a_fit.col_indices().numpy(), minlength=tfree.vocab_size) == 0)
        x[unused] = x0[name][unused]
        report.iterations[name] = iters
        report.unused_ids[name] = int(unused.sum())
        report.residual[name] = _residual(a_fit, x, y, w)
        report.residual_init[name] = _residual(a_fit, x0[name], y, w)
        if len(hold_idx):
            a_hold = _sparse(tfree, [chosen[i] for i in hold_idx], mean)
            yh, wh = y_all[name][hold_idx], w_all[hold_idx]
            report.heldout_residual[name] = _residual(a_hold, x, yh, wh)
            report.heldout_residual_init[name] = _residual(a_hold, x0[name], yh, wh)
        rows[name] = x.float()
    return rows, report, counts
