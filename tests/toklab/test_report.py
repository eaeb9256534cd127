"""toklab report and the command line: report.json keys and values, report.md, the plots; every verb
answers --help; errors are one line with exit code 2."""

from __future__ import annotations

import json

import pytest

from megatron_tfree.toklab.__main__ import VERBS, main
from megatron_tfree.toklab.report import report
from megatron_tfree.toklab.specs import BpeSpec

KEYS = {"tokenizer", "corpus", "fertility", "bytes_per_token", "chars_per_token", "nsl", "renyi_efficiency",
        "shannon_efficiency", "near_duplicate_share", "unused_share"}


def test_report_rows_and_files(probe_bpe, tmp_path):
    (tmp_path / "c").mkdir()
    text = "the cat sat on the mat. The cat? the CAT!\n" * 3
    (tmp_path / "c" / "a.txt").write_text(text)
    rows = report([str(probe_bpe), "tfree:v=1024,m=4"], ["multilingual", f"toy={tmp_path / 'c'}"], tmp_path / "out",
                  progress=False)
    assert len(rows) == 2 * 8 and all(KEYS <= set(r) for r in rows)
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == json.loads(json.dumps(rows))
    toy = {r["kind"]: r for r in rows if r["corpus"] == "toy"}
    spec = BpeSpec(probe_bpe)
    ids = spec.tokenizer.encode(text).ids
    words = len(text.split())
    assert toy["bpe"]["nsl"] == 1.0 and toy["bpe"]["fertility"] == pytest.approx(len(ids) / words)
    assert toy["bpe"]["bytes_per_token"] == pytest.approx(len(text.encode()) / len(ids))
    assert toy["bpe"]["unused_share"] == pytest.approx(1 - len(set(ids)) / 600)
    # T-Free units: the words and marks of the split (the newline markers included)
    from megatron_tfree.tokenizer import TrigramTokenizer

    units = len(TrigramTokenizer(vocab_size=1024, vocab_population=4).encode(text).units)
    assert toy["tfree"]["fertility"] == pytest.approx(units / words) and toy["tfree"]["nsl"] == pytest.approx(units / len(ids))
    assert toy["tfree"]["near_duplicate_share"] == 0.0 and toy["tfree"]["words_checked"] > 5
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| probe-600 | toy | 600 |" in md and "![metrics_vs_vocab](metrics_vs_vocab.png)" in md
    for png in ("metrics_vs_vocab.png", "fertility_per_corpus.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_answers_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out


def test_all_verbs_of_the_issue_exist():
    assert {"train", "report", "count", "prune", "swap", "soft"} <= set(VERBS)


def test_train_on_the_command_line_and_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["train", "--corpus", "multilingual", "--preset", "punct", "--vocab-size", "300", "--out", str(out)]) == 0
    assert "300 tokens; round trip checked" in capsys.readouterr().out
    assert BpeSpec(out).preset == "punct"
    assert main(["train", "--corpus", str(tmp_path / "nope.txt"), "--vocab-size", "300", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.txt is neither a file" in err[0]
