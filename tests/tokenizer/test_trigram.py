"""TrigramTokenizer: reference-exact md5 ids, partial lowercase, whole words, fast family, CSR, cache."""

import hashlib
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tfree.config import TokenizerConfig
from megatron_tfree.tokenizer import TrigramTokenizer, load_tokenizer
from megatron_tfree.tokenizer.trigram import is_edge, trigram_to_id, word_trigrams


def md5_mod(text, v):
    return int(hashlib.md5(text.encode()).hexdigest(), 16) % v


def spec_row(trigram: bytes, v: int, m: int) -> list:
    """Spec section 2, written independently: id = b0 + 256 b1 + 65536 b2; md5 rejection per slot."""
    i = trigram[0] + 256 * trigram[1] + 65536 * trigram[2]
    ids = set()
    for s in range(m):
        before, j = len(ids), 0
        while len(ids) == before:
            ids.add(md5_mod(f"{i}_{s}_{j}", v))
            j += 1
    return sorted(ids)


def spec_word_row(word: str, v: int, m: int, k: int) -> list:
    return [md5_mod(f"{word}_{i}", v) for i in range(m - k)] + [md5_mod(f"{word.lower()}_lower_{i}", v) for i in range(k)]


@pytest.mark.parametrize("v,m", [(8192, 10), (32000, 10), (50, 7), (16, 16)])
@pytest.mark.parametrize("tri", [b" a ", b"The", b"he ", b"\xc3\xa9 ", b"\x00\xff\x7f"])
def test_hash_rows_match_spec_formula(v, m, tri):
    tok = TrigramTokenizer(vocab_size=v, vocab_population=m)
    assert tok.trigram_ids(tri) == spec_row(tri, v, m)


def test_pinned_anchor_values():
    """Literal ids: any change here breaks every checkpoint trained with the reference."""
    tok = TrigramTokenizer(vocab_size=8192, vocab_population=10)
    assert tok.trigram_ids(" a ") == [767, 1091, 2276, 2359, 3805, 4410, 5055, 5282, 5678, 6812]
    tok7b = TrigramTokenizer(vocab_size=32000, vocab_population=10, vocab_population_partial_lowercase=2)
    assert tok7b.trigram_ids("the") == [1451, 9959, 11253, 18976, 20426, 21085, 24016, 24151, 26890, 27972]
    assert tok7b.trigram_ids("The") == [4866, 11110, 11487, 12881, 13363, 15171, 16248, 16603, 26890, 27972]
    assert md5_mod("0_0_0", 8192) == 6644  # the md5 scheme itself
    assert TrigramTokenizer(vocab_size=8192, vocab_population=10).trigram_ids(b"\x00\x00\x00")[0] == min(spec_row(b"\x00\x00\x00", 8192, 10))


def test_str_and_bytes_trigram_and_id():
    tok = TrigramTokenizer(vocab_size=1000, vocab_population=5)
    assert tok.trigram_ids("abc") == tok.trigram_ids(b"abc")
    assert trigram_to_id(b"abc") == 97 + 256 * 98 + 65536 * 99
    with pytest.raises(ValueError):
        tok.trigram_ids("ab")
    with pytest.raises(ValueError):
        tok.trigram_ids("é a")  # 4 bytes


@settings(max_examples=40, deadline=None)
@given(tri=st.binary(min_size=3, max_size=3), m=st.integers(1, 12))
def test_rows_are_m_distinct_sorted_in_range(tri, m):
    tok = TrigramTokenizer(vocab_size=97, vocab_population=m)
    row = tok.trigram_ids(tri)
    assert len(row) == m == len(set(row))
    assert row == sorted(row) and all(0 <= i < 97 for i in row)


def test_stable_across_instances_and_processes():
    a = TrigramTokenizer(vocab_size=8192, vocab_population=10).word_row("Stability").tolist()
    b = pickle.loads(pickle.dumps(TrigramTokenizer(vocab_size=8192, vocab_population=10))).word_row("Stability").tolist()
    code = (
        "from megatron_tfree.tokenizer.trigram import TrigramTokenizer as T;"
        "print(T(vocab_size=8192, vocab_population=10).word_row('Stability').tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2], env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert a == b == eval(out.stdout)


def test_word_trigrams_byte_level():
    assert word_trigrams("a") == [b" a "]
    assert word_trigrams("aaaa") == [b" aa", b"aaa", b"aa "]  # distinct, first-seen order
    assert word_trigrams("é") == [b" \xc3\xa9", b"\xc3\xa9 "]  # the 2-byte char is split
    assert word_trigrams("Hi") == [b" Hi", b"Hi "]
    assert [is_edge(t) for t in word_trigrams("cat")] == [True, False, True]
    with pytest.raises(ValueError):
        word_trigrams("")
    tok = TrigramTokenizer(vocab_size=8192, vocab_population=10)
    assert len(tok.word_row("a")) == 10 and tok.word_ids("a") == spec_row(b" a ", 8192, 10)


def test_word_row_is_trigram_rows_concatenated_and_word_ids_distinct():
    tok = TrigramTokenizer(vocab_size=64, vocab_population=6)  # small v: shared ids are likely
    word = "abracadabra"
    row = tok.word_row(word)
    expected = sum((spec_row(t, 64, 6) for t in word_trigrams(word)), [])
    assert row.dtype == np.int32 and row.tolist() == expected
    assert tok.word_ids(word) == sorted(set(expected))


def test_partial_lowercase_sharing():
    v, m, k = 32000, 10, 2
    tok = TrigramTokenizer(vocab_size=v, vocab_population=m, vocab_population_partial_lowercase=k)
    for cased, lower in [("The", "the"), (" Th", " th"), ("HE ", "he "), ("aBc", "abc"), ("XYZ", "xyz")]:
        row, lrow = tok.trigram_ids(cased), tok.trigram_ids(lower)
        assert row[-k:] == lrow[-k:] == spec_row(lower.encode(), v, m)[-k:]
        assert row[: m - k] == spec_row(cased.encode(), v, m)[: m - k]  # not re-sorted, as the reference
        assert lrow == spec_row(lower.encode(), v, m)  # lower-case rows untouched
    for unaffected in ["É a", "T1x", "T.e", "Tè"]:
        tri = unaffected.encode()[:3]
        assert tok.trigram_ids(tri) == spec_row(tri, v, m)
    # "The" and "the": the affected trigrams share exactly their last k ids
    for t_up, t_lo in zip(word_trigrams("The"), word_trigrams("the")):
        assert tok.trigram_ids(t_up)[-k:] == tok.trigram_ids(t_lo)[-k:]
    assert set(tok.trigram_ids("The")) != set(tok.trigram_ids("the"))
    plain = TrigramTokenizer(vocab_size=v, vocab_population=m)
    assert plain.trigram_ids("The") == spec_row(b"The", v, m)


def test_special_words_and_entire_words():
    v, m, k = 32000, 10, 2
    tok = TrigramTokenizer(vocab_size=v, vocab_population=m, vocab_population_partial_lowercase=k)
    for w in ["<|endoftext|>", "<|ws|>", "<|\n|>", "<|4<-ws->|>"]:
        assert tok.word_row(w).tolist() == spec_word_row(w, v, m, k)
    assert tok.eot_ids().indices.tolist() == spec_word_row("<|endoftext|>", v, m, k)
    ew = TrigramTokenizer(vocab_size=v, vocab_population=m, vocab_population_partial_lowercase=k, entire_words=True)
    assert ew.word_row("Hello").tolist() == spec_word_row("Hello", v, m, k)
    assert ew.word_row("Hello").tolist()[-k:] == ew.word_row("hello").tolist()[-k:]
    assert ew.word_patterns("Hello")[2] == 1


def test_lowercase_option_lowercases_words():
    tok = TrigramTokenizer(vocab_size=8192, vocab_population=10, lowercase=True)
    assert tok.word_row("The").tolist() == tok.word_row("the").tolist()
    assert tok.word_ids("<|endoftext|>") == sorted(set(spec_word_row("<|endoftext|>", 8192, 10, 0)))


def test_fast_family():
    a = TrigramTokenizer(vocab_size=8192, vocab_population=10, initialize="fast", seed=1)
    b = TrigramTokenizer(vocab_size=8192, vocab_population=10, initialize="fast", seed=1)
    c = TrigramTokenizer(vocab_size=8192, vocab_population=10, initialize="fast", seed=2)
    words = ["Hello", "world", "a", "<|endoftext|>", "naïve", "the", "The"]
    assert a.encode_units(words).indices.tolist() == b.encode_units(words).indices.tolist()
    assert a.encode_units(words).indices.tolist() != c.encode_units(words).indices.tolist()
    assert a.trigram_ids("abc") != TrigramTokenizer(vocab_size=8192, vocab_population=10).trigram_ids("abc")
    small = TrigramTokenizer(vocab_size=12, vocab_population=11, initialize="fast")  # forces redraws
    for tri in [bytes([x, 1, 2]) for x in range(50)]:
        row = small.trigram_ids(tri)
        assert len(set(row)) == 11 and row == sorted(row) and max(row) < 12
    pl = TrigramTokenizer(vocab_size=8192, vocab_population=10, vocab_population_partial_lowercase=3, initialize="fast")
    assert pl.trigram_ids("The")[-3:] == pl.trigram_ids("the")[-3:]
    # batch computation equals one-at-a-time computation
    fresh = TrigramTokenizer(vocab_size=8192, vocab_population=10, initialize="fast", seed=1)
    assert [fresh.trigram_ids(t) for t in word_trigrams("Hello")] == [a.trigram_ids(t) for t in word_trigrams("Hello")]


def test_csr_encode_units_equals_per_word_rows():
    tok = TrigramTokenizer(vocab_size=4096, vocab_population=8, vocab_population_partial_lowercase=2)
    words = ["The", "cat", "<|no_ws|>", ",", "the", "cat", "é", "<|endoftext|>", "The"]
    ids = tok.encode_units(words)
    assert len(ids) == len(words) and ids.indices.dtype == np.int32 and ids.offsets.dtype == np.int64
    ref = TrigramTokenizer(vocab_size=4096, vocab_population=8, vocab_population_partial_lowercase=2)
    for i, w in enumerate(words):
        assert ids.row(i).tolist() == ref.word_row(w).tolist()
        assert np.unique(ids.row(i)).tolist() == ref.word_ids(w)
    assert len(tok.encode_units([])) == 0
    assert tok.encode_units(iter(words)).indices.tolist() == ids.indices.tolist()
    with pytest.raises(TypeError):
        tok.encode_units("not a list")
    with pytest.raises(TypeError):
        tok.encode_units(["ok", 3])
    with pytest.raises(ValueError):
        tok.encode_units(["ok", ""])


def test_cache_is_bounded_and_transparent():
    words = [f"w{i}x" for i in range(40)]
    big = TrigramTokenizer(vocab_size=512, vocab_population=4)
    expected = big.encode_units(words).indices.tolist()
    small = TrigramTokenizer(vocab_size=512, vocab_population=4, cache_size=7)
    for start in range(0, 40, 5):
        chunk = words[start : start + 5]
        assert small.encode_units(chunk).indices.tolist() == big.encode_units(chunk).indices.tolist()
        assert small.cached_words <= 7 and small.cached_trigrams <= 7
    assert small.encode_units(words).indices.tolist() == expected  # one call larger than the cache
    assert small.cached_words <= 7 and small.cached_trigrams <= 7
    assert small.encode_units(words[:3] * 4).indices.tolist() == big.encode_units(words[:3] * 4).indices.tolist()


def test_word_patterns_split_edge_and_inner():
    tok = TrigramTokenizer(vocab_size=8192, vocab_population=10)
    inner, edge, c = tok.word_patterns("cat")
    assert c == 3
    assert edge.tolist() == sorted(set(spec_row(b" ca", 8192, 10)) | set(spec_row(b"at ", 8192, 10)))
    assert inner.tolist() == sorted(set(spec_row(b"cat", 8192, 10)) - set(edge.tolist()))
    inner, edge, c = tok.word_patterns("<|ws|>")
    assert c == 1 and len(edge) == 0 and inner.tolist() == sorted(set(spec_word_row("<|ws|>", 8192, 10, 0)))


def test_save_load_from_config(tmp_path):
    tok = TrigramTokenizer(vocab_size=32000, vocab_population=10, vocab_population_partial_lowercase=2, initialize="fast", seed=7, entire_words=False)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, TrigramTokenizer) and again.config_dict() == tok.config_dict()
    assert again.word_row("Hello").tolist() == tok.word_row("Hello").tolist()
    cfg = TokenizerConfig(vocab_size=1234, vocab_population=5, vocab_population_partial_lowercase=1)
    ft = TrigramTokenizer.from_config(cfg)
    assert (ft.vocab_size, ft.vocab_population, ft.end_of_text, ft.kind) == (1234, 5, "<|endoftext|>", "tfree")
    with pytest.raises(FileNotFoundError):
        TrigramTokenizer.load(tmp_path / "missing")
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "tfree", "vocab_size": 10, "colour": 1}')
    with pytest.raises(ValueError, match="colour"):
        TrigramTokenizer.load(tmp_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(vocab_size=0),
        dict(vocab_size=10, vocab_population=11),
        dict(vocab_population=10, vocab_population_partial_lowercase=11),
        dict(initialize="orthogonal"),
        dict(cache_size=0),
        dict(end_of_text="eot"),
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        TrigramTokenizer(**kwargs)


def test_encode_text_uses_word_splitter():
    words = pytest.importorskip("megatron_tfree.tokenizer.words")
    tok = TrigramTokenizer(vocab_size=8192, vocab_population=10)
    text = "Hello World!\nA,B  end"
    enc = tok.encode(text)
    assert enc.units == words.text_to_words(text)
    assert enc.ids.indices.tolist() == tok.encode_units(enc.units).indices.tolist()
    assert tok.decode(enc.units) == text
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
