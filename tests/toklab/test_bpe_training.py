"""toklab train: presets, custom regexes, the data mix, the round-trip check, and the fast exact pre-token
measuring path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_tfree.toklab.presets import PRESETS, identify, pre_tokenizer
from megatron_tfree.toklab.sources import Source, Shard, mix, parse_corpus
from megatron_tfree.toklab.specs import BpeSpec, load_spec
from megatron_tfree.toklab.train import check_round_trip, train_bpe

PROBE = parse_corpus("multilingual")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_trains_a_round_tripping_tokenizer(preset, tmp_path):
    tok = train_bpe(PROBE, 320, preset=preset)  # train_bpe itself checks the round trip on the corpus
    assert tok.get_vocab_size(with_added_tokens=True) == 320 and tok.token_to_id("<|endoftext|>") == 0
    path = tmp_path / "t.json"
    tok.save(str(path))
    assert identify(json.loads(path.read_text())) == preset
    text = "Numbers 12345 and ünïcödé\n\n  spaces\t<|endoftext|>"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_presets_cut_numbers_and_words_as_specified():
    cut = {name: [p for p, _ in pre_tokenizer(name).pre_tokenize_str("I'm 12345 ok!")] for name in
           ("gpt4", "gpt4-num2", "punct", "identity")}
    # the byte-level step shows a space as "Ġ"
    assert cut["gpt4"] == ["I", "'m", "Ġ", "123", "45", "Ġok", "!"]
    assert cut["gpt4-num2"] == ["I", "'m", "Ġ", "12", "34", "5", "Ġok", "!"]
    assert cut["punct"] == ["I", "'", "m", "Ġ", "123", "45", "Ġok", "!"]
    assert cut["identity"] == ["I'mĠ12345Ġok!"]


def test_a_custom_regex_and_its_errors(tmp_path):
    tok = train_bpe(PROBE[:1], 300, preset=None, regex=r"\p{L}+|\s+|[^\s\p{L}]")
    path = tmp_path / "c.json"
    tok.save(str(path))
    assert identify(json.loads(path.read_text())) == "custom"
    with pytest.raises(ValueError, match="invalid pre-tokenisation regex"):
        pre_tokenizer(regex="(unclosed")
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        pre_tokenizer("gpt5")
    with pytest.raises(ValueError, match="--vocab-size must cover the 256 bytes and 1 special tokens, got 200"):
        train_bpe(PROBE, 200)


def test_the_round_trip_check_names_the_first_bad_document():
    from tokenizers import normalizers

    tok = train_bpe(PROBE[:1], 300)
    tok.normalizer = normalizers.Lowercase()
    with pytest.raises(ValueError, match=r"does not round-trip document 1: first difference at character 0 "
                                         r"\('Abc' came back as 'abc'\)"):
        check_round_trip(tok, iter(["abc", "Abc"]))


def test_the_mix_takes_characters_by_weight(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 100)
    (tmp_path / "b.txt").write_text("b" * 40)
    a, b = Source("a", [Shard(str(tmp_path / "a.txt"))]), Source("b", [Shard(str(tmp_path / "b.txt"))])
    # 70/30 of as many characters as the scarcest allows: b has 40 = 30% of 133
    docs = list(mix([a, b], [0.7, 0.3]))
    assert docs == ["a" * 93, "b" * 40]
    assert list(mix([a, b], [1, 1], total_chars=60)) == ["a" * 30, "b" * 30]
    with pytest.raises(ValueError, match="one positive weight per source"):
        list(mix([a, b], [1.0]))


def test_corpus_specs(tmp_path):
    assert [s.name for s in PROBE] == ["en", "de", "ru", "vi", "ar", "zh", "code"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("hello")
    assert [list(s.documents()) for s in parse_corpus(f"mine={tmp_path / 'd'}")] == [["hello"]]
    with pytest.raises(FileNotFoundError, match="is neither a file, a directory nor a MemoryMap prefix"):
        parse_corpus(str(tmp_path / "nothing"))


@pytest.mark.parametrize("preset", ["gpt4", "punct-num2", "gpt2", "identity"])
def test_measuring_through_pre_tokens_equals_encoding_documents(preset, tmp_path):
    path = tmp_path / "t.json"
    train_bpe(PROBE, 400, preset=preset).save(str(path))
    spec = BpeSpec(path)
    assert (spec.pattern is None) == (preset == "identity")  # no split: whole documents only
    docs = [d for s in PROBE for d in s.documents()] + ["x<|endoftext|>y <|endoftext|>\n 1234567"]
    fast, whole = spec.measure(docs), spec.tally(docs)
    assert fast.units == whole.units and np.array_equal(fast.id_counts, whole.id_counts)
    assert (fast.words, fast.bytes, fast.chars) == (whole.words, whole.bytes, whole.chars)


def test_tfree_specs():
    spec = load_spec("tfree:v=4096,m=8,k=2")
    assert (spec.vocab_size, spec.tokenizer.vocab_population, spec.name) == (4096, 8, "tfree v=4096 m=8 k=2")
    t = spec.tally(["Hello world, hello!"])
    assert t.units == 5 and t.words == 3 and t.id_counts.sum() == sum(len(spec.tokenizer.encode_units([w]).indices)
                                                                      for w in ["Hello", "world", ",", "hello", "!"])
    with pytest.raises(ValueError, match="expected key=value with keys"):
        load_spec("tfree:v=4096,q=1")
    with pytest.raises(FileNotFoundError, match="a SPEC is a tokenizer.json or tfree:"):
        load_spec("missing.json")
