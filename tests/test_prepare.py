"""The prepare entry point and tokenizer statistics on a small local corpus (no download)."""

import json

from megatron_tfree.data.convert import convert_text_files
from megatron_tfree.prepare import main
from megatron_tfree.tokenizer import TrigramTokenizer
from megatron_tfree.tokenizer.stats import format_stats, measure


def test_measure_counts_units_and_fertility():
    tok = TrigramTokenizer(vocab_size=512, vocab_population=4)
    stats = measure(tok, ["Hello World!", "A,B"])
    # [Hello, World, !] and [A, ",", <|no_ws|>, B] (spec section 1 examples)
    assert (stats.documents, stats.units, stats.whitespace_words) == (2, 7, 3)
    assert stats.bytes == len("Hello World!") + len("A,B")
    assert stats.distinct_units == 7
    assert abs(stats.fertility - 7 / 3) < 1e-12
    # every unit has at least m ids (a special word exactly m)
    assert stats.ids >= 7 * 4
    table = format_stats(stats, hidden_size=64, baseline_vocab=65536)
    assert "fertility" in table and "0.8% of a 64k" in table  # 512 / 65536 = 0.78%


def test_prepare_on_local_prefixes_writes_json(tmp_path):
    src = tmp_path / "txt"
    src.mkdir()
    for i in range(3):
        (src / f"doc{i}.txt").write_text(f"Document {i}. " + "To be, or not to be: that is the question. " * 40)
    convert_text_files([src], str(tmp_path / "train"), progress=False)
    convert_text_files([src / "doc0.txt"], str(tmp_path / "valid"), progress=False)
    out = tmp_path / "stats.json"
    rc = main(["--json", str(out), f"data.prefix_paths=[{tmp_path / 'train'}]",
               f"data.valid_prefix_paths=[{tmp_path / 'valid'}]", "data.seq_len=16",
               "tokenizer.vocab_size=1024"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["train"]["documents"] == 3 and report["valid"]["documents"] == 1
    assert report["train"]["samples"] > 0
    assert report["train"]["units"] == 3 * report["valid"]["units"]  # same text per document (digit differs)


def test_prepare_reports_config_errors(capsys):
    assert main(["model.hidden_size=-1"]) == 2
    assert "model.hidden_size" in capsys.readouterr().err
