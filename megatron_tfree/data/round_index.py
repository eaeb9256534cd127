"""The files of multiple-round training: the scores of one epoch and the sample index of a round.

Scores directory (``score --out INDEX_DIR``)::

    scores.json            metadata (format, job key, checkpoint, data fingerprint, batch size, seed,
                           epoch, number of batches, loss statistics); written last: a complete result
    scores.npy             float64 [n]: the loss of batch k
    batches.npy            int64 [n, B]: the sample ids of batch k, in the trainer's order
    parts/rank00000.npz    while scoring: what each rank has scored so far (arrays ``batch``, ``loss``,
                           ``key``); rewritten atomically at every flush, removed once scores.* exist

Sample index (``sample --out NAME.npy``)::

    NAME.npy               int64 [N0 * B]: the sample ids of the chosen batches, flattened
    NAME.json              sidecar: the chosen batch ids, temperature, seed, the scores it came from,
                           the data fingerprint, and the sha256 of NAME.npy's ids

Every file is written to a temporary name and renamed into place, and read without unpickling
(``np.load(allow_pickle=False)``, JSON). The *data fingerprint* (:func:`data_fingerprint`) says which
training set the sample ids refer to; the trainer refuses an index whose sidecar names other data
(:func:`read_sample_index`, called where the training dataloader picks its order).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import ConfigError

SCORES_FORMAT = "megatron_tfree.multiround.scores"
INDEX_FORMAT = "megatron_tfree.multiround.sample_index"
VERSION = 1
SCORES_JSON, SCORES_NPY, BATCHES_NPY, PARTS_DIR = "scores.json", "scores.npy", "batches.npy", "parts"


# --------------------------------------------------------------------------------------------------
# atomic files, no pickles
# --------------------------------------------------------------------------------------------------


def _replace_with(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write one array as ``.npy`` atomically."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    _replace_with(Path(path), buf.getvalue())


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write arrays as ``.npz`` atomically (no object arrays)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _replace_with(Path(path), buf.getvalue())


def save_json(path: str | os.PathLike, data: Any) -> None:
    _replace_with(Path(path), (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def load_npy(path: str | os.PathLike, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: {path} is not a readable .npy array ({e})") from None


def load_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: {path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object")
    return data


def ids_sha256(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def job_key(job: dict[str, Any]) -> str:
    """A short digest of what defines a scoring job (partial results of another job are never mixed in)."""
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:20]


# --------------------------------------------------------------------------------------------------
# which data the ids refer to
# --------------------------------------------------------------------------------------------------


def data_fingerprint(cfg: Any, tokenizer: Any, num_samples: int) -> dict[str, Any]:
    """What makes sample id ``j`` the same sample: the training set (prefixes, packing, seq_len), the
    tokenizer and the number of samples. ``prefix_paths`` are absolute ([] = the default corpus)."""
    d = cfg.data
    tok = {k: v for k, v in tokenizer.config_dict().items() if k != "cache_size"}
    return {"prefix_paths": [os.path.abspath(p) for p in d.prefix_paths], "finetuning": d.finetuning,
            "seq_len": d.seq_len, "aligned_max_bytes": d.aligned_max_bytes, "tokenizer": tok,
            "num_samples": int(num_samples)}


_FINGERPRINT_KEYS = {"prefix_paths": "data.prefix_paths", "finetuning": "data.finetuning", "seq_len": "data.seq_len",
                     "aligned_max_bytes": "data.aligned_max_bytes", "tokenizer": "the tokenizer",
                     "num_samples": "the number of training samples"}


def fingerprint_differences(theirs: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """``"key: X there, Y here"`` for every fingerprint entry that differs."""
    return [f"{name}: {theirs.get(k)!r} there, {mine.get(k)!r} here" for k, name in _FINGERPRINT_KEYS.items()
            if theirs.get(k) != mine.get(k)]


# --------------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------------


def read_scores(directory: str | os.PathLike) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """``(metadata, losses [n] float64, batches [n, B] int64)`` of a complete scores directory."""
    directory = Path(directory)
    what = f"scores {directory}"
    if not (directory / SCORES_JSON).is_file():
        hint = " (scoring is incomplete: rerun `score` to finish it)" if (directory / PARTS_DIR).is_dir() else ""
        raise FileNotFoundError(f"{what}: no {SCORES_JSON}{hint}")
    meta = load_json(directory / SCORES_JSON, what)
    if meta.get("format") != SCORES_FORMAT:
        raise ValueError(f"{what}: {SCORES_JSON} is not a scores file (format {meta.get('format')!r})")
    losses = load_npy(directory / SCORES_NPY, what)
    batches = load_npy(directory / BATCHES_NPY, what)
    n, b = meta["num_batches"], meta["batch_size"]
    if losses.shape != (n,) or batches.shape != (n, b) or not np.issubdtype(batches.dtype, np.integer):
        raise ValueError(f"{what}: {SCORES_NPY} {losses.shape} / {BATCHES_NPY} {batches.shape} do not match "
                         f"{SCORES_JSON} ({n} batches of {b})")
    return meta, losses.astype(np.float64, copy=False), batches.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------------
# sample index
# --------------------------------------------------------------------------------------------------


def sidecar_path(index_path: str | os.PathLike) -> Path:
    """``NAME.json`` beside ``NAME.npy``."""
    return Path(index_path).with_suffix(".json")


def write_sample_index(path: str | os.PathLike, ids: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write ``ids`` (1-D int64) to ``path`` (.npy) and ``meta`` (+ format, count, sha256) to its sidecar.
    The sidecar goes first and names the ids' digest, so a sidecar never describes another index."""
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"--out must end in .npy (the trainer's data.sample_index), got {path}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"a sample index is 1-D, got shape {ids.shape}")
    full = {"format": INDEX_FORMAT, "version": VERSION, "num_ids": int(ids.size), "ids_sha256": ids_sha256(ids),
            **meta}
    save_json(sidecar_path(path), full)
    save_npy(path, ids)
    return path


def read_sample_index(path: str | os.PathLike, num_samples: int,
                      fingerprint: Optional[dict[str, Any]] = None, key: str = "data.sample_index") -> np.ndarray:
    """The ids of the sample index at ``path``, checked for a training set of ``num_samples`` samples.

    Errors name ``key`` and the file: missing file (FileNotFoundError), not a 1-D integer array, empty,
    an id outside ``[0, num_samples)`` (the first bad id and its position), a sidecar whose digest does
    not match the ids, or (given ``fingerprint``) a sidecar made for other data (ConfigError). A hand-made
    index without a sidecar is only checked for its ids.
    """
    where = f"{key} = {str(path)!r}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no such file (write one with python -m megatron_tfree.multiround sample)")
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: not a readable .npy array ({e})") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"{where}: must be a 1-D array of integer sample ids, got {ids.dtype} of shape {ids.shape}")
    if ids.size == 0:
        raise ConfigError(f"{where}: holds no sample ids")
    ids = ids.astype(np.int64, copy=False)
    side = sidecar_path(path)
    if side.is_file():
        try:
            meta = load_json(side, where)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if meta.get("format") != INDEX_FORMAT:
            raise ConfigError(f"{where}: {side.name} beside it is not a sample index sidecar")
        if meta.get("ids_sha256") != ids_sha256(ids):
            raise ConfigError(f"{where}: {side.name} describes another index (its ids_sha256 differs); rewrite "
                              f"both with `multiround sample`, or delete the sidecar of a hand-made index")
        if fingerprint is not None and isinstance(meta.get("data"), dict):
            diff = fingerprint_differences(meta["data"], fingerprint)
            if diff:
                raise ConfigError(f"{where} was made for other training data than this config's:\n  " +
                                  "\n  ".join(diff))
    bad = np.flatnonzero((ids < 0) | (ids >= num_samples))
    if bad.size:
        i = int(bad[0])
        raise ConfigError(f"{where}: sample id {int(ids[i])} (at position {i}, {bad.size} bad ids in all) is outside "
                          f"the training set of {num_samples} samples: the index was made for other data")
    return ids
