"""Tests of the T-Free word splitter (spec section 1): examples, rules, and the round-trip property.

``_oracle`` is a slow, literal transcription of the spec's steps (items, then rules a-c, newline
words, run merging), plus the module's escape rule for marker look-alikes. The fast implementation
must give the same words on every text, and ``words_to_text`` must invert it exactly.
"""

from __future__ import annotations

import itertools
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_tfree.tokenizer.words import (
    END_OF_TEXT,
    MARKER_TEXT,
    NEWLINE,
    NO_SPACE_AFTER,
    NO_SPACE_BEFORE,
    NO_WS,
    SPECIAL_WORDS,
    WS,
    is_special,
    text_to_words,
    words_to_text,
)

W2, W4 = "<|2<-ws->|>", "<|4<-ws->|>"
N2, N4 = "<|2<-\n->|>", "<|4<-\n->|>"


def _oracle_piece(piece: str) -> list[str]:
    items = [x for x in re.split(r"(\d|\W|_)", piece) if x]
    step_a: list[str] = []
    for i, item in enumerate(items):
        left = items[i - 1] if i else None
        if (
            left is not None
            and " " not in (left, item)
            and left[-1] not in NO_SPACE_AFTER
            and item[0] not in NO_SPACE_BEFORE
        ):
            step_a.append(NO_WS)
        step_a.append(item)
    step_c: list[str] = []
    for i, item in enumerate(step_a):
        if item != " ":
            step_c.append(item)
        elif i == 0 or i == len(step_a) - 1:
            step_c.append(WS)
        else:
            left, right = step_a[i - 1], step_a[i + 1]
            if left[-1] in NO_SPACE_AFTER or right[0] in NO_SPACE_BEFORE or is_special(left) or is_special(right):
                step_c.append(WS)
    merged: list[str] = []
    for key, group in itertools.groupby(NEWLINE if x == "\n" else x for x in step_c):
        count = len(list(group))
        if key not in (WS, NEWLINE):
            merged += [key] * count
            continue
        tag = "ws" if key == WS else "\n"
        p, r = divmod(count, 2)
        while p > 2:
            merged.append(f"<|4<-{tag}->|>")
            p -= 2
        if p:
            merged.append(f"<|{2 * p}<-{tag}->|>")
        if r:
            merged.append(key)
    return merged


def _oracle(text: str) -> list[str]:
    words: list[str] = []
    pos = 0
    for m in re.finditer(r"<\|.*?\|>", text):
        if m.group() in MARKER_TEXT:  # escape rule: a look-alike stays ordinary text
            continue
        words += _oracle_piece(text[pos : m.start()]) + [m.group()]
        pos = m.end()
    return words + _oracle_piece(text[pos:])


def _check(text: str) -> list[str]:
    words = text_to_words(text)
    assert words == _oracle(text)
    assert words_to_text(words) == text
    assert all(words), "no empty words"
    for w in words:  # a word with <| is a marker made by the splitter or a real special token
        if is_special(w) and w not in MARKER_TEXT:
            assert re.fullmatch(r"<\|.*?\|>", w) and w not in MARKER_TEXT
    return words


# --- examples ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", []),
        ("Hello World!", ["Hello", "World", "!"]),
        ("A,B", ["A", ",", NO_WS, "B"]),
        ("Hello World!<|endoftext|>abc", ["Hello", "World", "!", END_OF_TEXT, "abc"]),
        ("Hello<|startoftext|> World!", ["Hello", "<|startoftext|>", WS, "World", "!"]),
        ("Hello\nWorld!", ["Hello", NEWLINE, "World", "!"]),
        (
            "This is a <|test with some numbers 1234.",
            ["This", "is", "a", "<", "|", NO_WS, "test", "with", "some", "numbers", WS, "1", "2", "3", "4", "."],
        ),
        (
            " Hello1 world 123!!  ( a). ",
            [WS, "Hello", "1", "world", WS, "1", "2", "3", "!", "!", W2, "(", WS, "a", ")", ".", WS],
        ),
    ],
)
def test_examples(text, expected):
    assert _check(text) == expected


def test_digits_split_one_by_one():
    assert _check("in 2024") == ["in", WS, "2", "0", "2", "4"]
    assert _check("x1y") == ["x", "1", NO_WS, "y"]
    assert _check("٣٤") == ["٣", NO_WS, "٤"]  # non-ASCII digits are split, but are not in the sets
    assert _check("x²") == ["x²"]  # superscripts are word characters, not \d


def test_letters_of_any_script_stay_whole():
    assert _check("Grüße, мир 世界") == ["Grüße", ",", "мир", "世界"]
    assert _check("snake_case") == ["snake", "_", "case"]


def test_special_tokens_shortest_match_verbatim():
    assert _check("<|a|>b|>") == ["<|a|>", "b", NO_WS, "|", ">"]
    assert _check("a <|x y|> b") == ["a", WS, "<|x y|>", WS, "b"]
    assert _check("<|<|x|>") == ["<|<|x|>"]
    assert _check(END_OF_TEXT + END_OF_TEXT) == [END_OF_TEXT, END_OF_TEXT]
    # no whitespace rule crosses a special token: the runs on each side are merged separately
    assert _check("  <|s|>  ") == [W2, "<|s|>", W2]
    # a special token never spans a newline, and a lone <| is plain text
    assert _check("<|a\n|>") == ["<", "|", NO_WS, "a", NEWLINE, "|", ">"]
    assert _check("<|") == ["<", "|"]


@pytest.mark.parametrize("marker", [WS, NO_WS, W2, W4])
def test_marker_look_alikes_in_text_are_plain_text(marker):
    words = _check(f"a {marker}b{marker}")
    assert marker not in words or marker == NO_WS
    assert _check(WS) == ["<", "|", NO_WS, "ws", NO_WS, "|", ">"]
    assert _check(NO_WS) == ["<", "|", NO_WS, "no", "_", "ws", NO_WS, "|", ">"]


def test_newline_markers_in_text_are_plain_text():
    for text in (NEWLINE, N2, N4, NEWLINE * 3):
        assert words_to_text(_check(text)) == text


RUNS = {
    1: ["1"], 2: ["2"], 3: ["2", "1"], 4: ["4"], 5: ["4", "1"], 6: ["4", "2"],
    7: ["4", "2", "1"], 8: ["4", "4"], 9: ["4", "4", "1"], 10: ["4", "4", "2"], 13: ["4", "4", "4", "1"],
}


@pytest.mark.parametrize("count", sorted(RUNS))
def test_run_merging(count):
    ws = {"1": WS, "2": W2, "4": W4}
    nl = {"1": NEWLINE, "2": N2, "4": N4}
    assert _check("(" + " " * count + ")") == ["("] + [ws[k] for k in RUNS[count]] + [")"]
    assert _check("a" + "\n" * count + "b") == ["a"] + [nl[k] for k in RUNS[count]] + ["b"]
    assert _check(" " * count) == [ws[k] for k in RUNS[count]]


def test_space_rules():
    assert _check("a b") == ["a", "b"]  # the default single space is dropped
    assert _check("a  b") == ["a", W2, "b"]
    assert _check(" a ") == [WS, "a", WS]  # piece start and end
    assert _check("( a )") == ["(", WS, "a", WS, ")"]  # after NO_SPACE_AFTER, before NO_SPACE_BEFORE
    assert _check("a \n b") == ["a", WS, NEWLINE, WS, "b"]
    assert _check("a\tb") == ["a", NO_WS, "\t", NO_WS, "b"]  # only U+0020 is a space
    assert _check("a\u00a0b c\u2028") == ["a", NO_WS, "\u00a0", NO_WS, "b", "c", NO_WS, "\u2028"]
    assert _check("a\r\nb") == ["a", NO_WS, "\r", NEWLINE, "b"]


def test_lowercase_option():
    assert text_to_words("Hello WORLD", lowercase=True) == ["hello", "world"]
    assert text_to_words("Hello WORLD") == ["Hello", "WORLD"]
    assert text_to_words("<|ENDOFTEXT|>", lowercase=True) == [END_OF_TEXT]


def test_is_special_and_constants():
    assert all(is_special(w) for w in SPECIAL_WORDS)
    assert not any(is_special(w) for w in ("a", "<", "|>", "<-ws->"))
    assert END_OF_TEXT == "<|endoftext|>" and NEWLINE == "<|\n|>"
    assert {"\n", " ", "(", "_"} <= NO_SPACE_AFTER and "." not in NO_SPACE_AFTER
    assert {"\n", " ", ")", "7"} <= NO_SPACE_BEFORE and "(" not in NO_SPACE_BEFORE


def test_words_to_text_of_given_words():
    assert words_to_text(["a", W4, WS, "b", "c", NO_WS, "d", ",", "e"]) == "a     b cd, e"
    assert words_to_text(["x", "", "y"]) == "x y"  # empty words are ignored
    assert words_to_text(["a", "<|s|>", "b"]) == "a<|s|>b"


def test_text_using_every_cheap_placeholder_character():
    # forces the separator and placeholders into the private-use area
    text = "".join(map(chr, [*range(0x00, 0x09), *range(0x0E, 0x20)])) + " a  b\n\n\ue000 <|x|>٣"
    _check(text)


def test_long_english_like_text():
    rng = random.Random(0)
    vocab = "the of and to in a is that for it (as) was 42 don't \"quoted\" e-mail.".split()
    text = "".join(rng.choice(vocab) + rng.choice([" ", " ", " ", "  ", "\n", ", ", ". "]) for _ in range(20000))
    _check(text)


# --- properties -------------------------------------------------------------------------------

FRAGMENTS = [
    " ", "  ", "   ", "\n", "\n\n", "\t", "\r", "\u00a0", "\u2028", "\x00", "\x01", "\ue000",
    "<|", "|>", "<", "|", ">", "-", WS, NO_WS, W2, W4, NEWLINE, N2, END_OF_TEXT, "<|x|>",
    "Hello", "wörld", "Ab", "12", "_", ",", ".", "(", ")", "'", "#", "٣", "x²", "e\u0301",
]
mixed_text = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=25).map("".join)
FAST = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.text(max_size=80))
def test_round_trip_arbitrary_unicode(text):
    _check(text)


@FAST
@given(mixed_text)
def test_round_trip_whitespace_and_look_alikes(text):
    _check(text)


@settings(max_examples=300, deadline=None)
@given(mixed_text)
def test_round_trip_lowercase(text):
    words = text_to_words(text, lowercase=True)
    assert words == _oracle(text.lower())
    assert words_to_text(words) == text.lower()
