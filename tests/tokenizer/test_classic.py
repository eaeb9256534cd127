"""ClassicTokenizer: offline byte-level BPE training, encode/decode, save/load, build/load helpers."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from megatron_tfree.config import TokenizerConfig
from megatron_tfree.tokenizer import ClassicTokenizer, build_tokenizer, load_tokenizer

TEXTS = [
    "To be, or not to be, that is the question:\n",
    "Whether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\n",
    "Or to take arms against a sea of troubles\n",
    "Und Ärger über Öl, naïve café — ünïcödé 123.\n",
] * 20


@pytest.fixture(scope="module")
def tok():
    return ClassicTokenizer.train(TEXTS, vocab_size=400)


def test_train_encode_decode_roundtrip(tok):
    text = "To be or not, café 42 <|endoftext|> The question!"
    enc = tok.encode(text)
    assert len(enc) == len(enc.ids) and len(enc.units) == len(enc.ids.indices)
    assert enc.ids.offsets.tolist() == list(range(len(enc.units) + 1))
    assert enc.ids.indices.dtype == np.int32 and int(enc.ids.indices.max()) < tok.vocab_size
    assert "<|endoftext|>" in enc.units  # the special token is one unit
    assert tok.decode(enc.units) == text
    assert tok.decode_ids(enc.ids.indices) == text
    assert tok.encode_units(enc.units).indices.tolist() == enc.ids.indices.tolist()
    assert tok.encode_ids(text).tolist() == enc.ids.indices.tolist()
    # merges were learned: frequent words are fewer tokens than bytes
    assert len(tok.encode(" question").units) < len(" question".encode())


def test_eot_and_errors(tok):
    eot = tok.eot_ids()
    assert len(eot) == 1 and tok.kind == "classic" and tok.end_of_text == "<|endoftext|>"
    with pytest.raises(KeyError):
        tok.encode_units(["definitely-not-a-token"])
    with pytest.raises(TypeError):
        tok.encode_units("text")
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(ValueError):
        ClassicTokenizer.train(TEXTS, vocab_size=100)
    with pytest.raises(FileNotFoundError):
        ClassicTokenizer.from_file("/nonexistent/tokenizer.json")
    with pytest.raises(ValueError):
        ClassicTokenizer(tok.hf_tokenizer, end_of_text="<|missing|>")


def test_save_load_and_pickle(tok, tmp_path):
    tok.save(tmp_path / "t")
    assert (tmp_path / "t" / "tokenizer.json").is_file()
    again = load_tokenizer(tmp_path / "t")
    assert isinstance(again, ClassicTokenizer) and again.vocab_size == tok.vocab_size
    text = "".join(TEXTS[:5])
    assert again.encode(text).ids.indices.tolist() == tok.encode(text).ids.indices.tolist()
    assert pickle.loads(pickle.dumps(tok)).encode(text).units == tok.encode(text).units


def test_train_from_files_and_build_tokenizer(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text("".join(TEXTS[i::3]), encoding="utf-8")
    files = sorted(str(p) for p in corpus.glob("*.txt"))
    from_dir = ClassicTokenizer.train(corpus, vocab_size=300)
    from_list = ClassicTokenizer.train([Path(f) for f in files], vocab_size=300)
    assert from_dir.encode(TEXTS[0]).units == from_list.encode(TEXTS[0]).units

    cfg = TokenizerConfig(kind="classic", tokenizer_file=str(tmp_path / "bpe" / "tokenizer.json"), classic_vocab_size=300)
    with pytest.raises(FileNotFoundError):
        build_tokenizer(cfg)  # no file and nothing to train on
    built = build_tokenizer(cfg, train_files=files)
    assert Path(cfg.tokenizer_file).is_file() and built.vocab_size <= 300
    loaded = build_tokenizer(cfg)  # now read from the file
    assert loaded.encode(TEXTS[1]).units == built.encode(TEXTS[1]).units
    with pytest.raises(ValueError):
        build_tokenizer(TokenizerConfig(kind="classic"))


def test_build_tfree_and_load_errors(tmp_path):
    tf = build_tokenizer(TokenizerConfig(vocab_size=1000, vocab_population=4))
    assert tf.kind == "tfree" and tf.vocab_size == 1000
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "wordpiece"}')
    with pytest.raises(ValueError):
        load_tokenizer(tmp_path)


def test_train_on_long_texts_that_cannot_be_paths():
    text = "hello world, hello there. " * 20  # 520 chars: longer than a file name may be
    tok = ClassicTokenizer.train([text, text], vocab_size=300, min_frequency=1)
    assert tok.decode_ids(tok.encode_ids(text).tolist()) == text
