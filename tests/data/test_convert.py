"""Converters: text/JSONL/JSON/Parquet -> MemoryMap, instruction JSONL, error accounting, CLIs."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tfree.data import convert
from megatron_tfree.data.aligned import AlignedMemoryMap
from megatron_tfree.data.convert import (
    InstructionRecordError,
    Piece,
    convert_instruct_jsonl,
    convert_text_files,
    read_instruction_record,
)
from megatron_tfree.data.memory_map import MemoryMap

REPO = Path(__file__).resolve().parents[2]


def docs_of(prefix) -> list[str]:
    mm = MemoryMap(prefix)
    return [mm.document_bytes(i).decode("utf-8") for i in range(len(mm))]


def test_directory_of_text_files_recursive_sorted(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("first doc\nwith two lines\n", encoding="utf-8")
    (src / "sub" / "b.txt").write_text("zweites Dokument 😀", encoding="utf-8")
    with gzip.open(src / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gzipped €")
    (src / "ignored.csv").write_text("x")
    (src / "empty.txt").write_text("")
    s = convert_text_files([src], tmp_path / "out", progress=False)
    assert docs_of(tmp_path / "out") == ["first doc\nwith two lines\n", "gzipped €", "zweites Dokument 😀"]
    assert s.documents_written == 3 and s.files == 4
    assert s.skipped == {"empty_document": 1} and "empty.txt:1" in s.examples[0]


def test_split_lines_and_blank_lines_with_bad_utf8(tmp_path):
    raw = b"line one\r\n\nline \xff bad\n  \nline four\n"
    (tmp_path / "t.txt").write_bytes(raw)
    s = convert_text_files([tmp_path / "t.txt"], tmp_path / "lines", split="lines", progress=False)
    assert docs_of(tmp_path / "lines") == ["line one", "line four"]
    assert s.skipped == {"blank_line": 2, "invalid_utf8": 1}
    assert any(e.startswith(f"{tmp_path / 't.txt'}:3: invalid_utf8") for e in s.examples)

    (tmp_path / "p.txt").write_bytes(b"para one\nstill one\n\n\npara \xc3 two\nmore\n\npara three")
    s = convert_text_files([tmp_path / "p.txt"], tmp_path / "paras", split="blank_lines", progress=False)
    assert docs_of(tmp_path / "paras") == ["para one\nstill one", "para three"]
    assert s.skipped == {"invalid_utf8": 1} and f"{tmp_path / 'p.txt'}:5: invalid_utf8" in s.examples[0]


def test_jsonl_errors_counted_with_file_and_line(tmp_path):
    lines = [
        json.dumps({"text": "good one", "meta": 1}).encode(),
        b'{"text": "broken',
        json.dumps({"body": "no text key"}).encode(),
        json.dumps({"text": 42}).encode(),
        b"\xff\xfe not utf8",
        b"[1, 2]",
        json.dumps({"text": "\ud800"}).encode(),  # lone surrogate
        b"",
        json.dumps({"text": "good two ü"}, ensure_ascii=False).encode(),
    ]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    s = convert_text_files([path], tmp_path / "out", progress=False)
    assert docs_of(tmp_path / "out") == ["good one", "good two ü"]
    assert s.skipped == {"bad_json": 1, "missing_key": 1, "not_a_string": 1, "invalid_utf8": 1,
                         "not_an_object": 1, "invalid_unicode": 1, "blank_line": 1}
    assert s.examples[:3] == [f"{path}:2: bad_json (Unterminated string starting at)",
                              f"{path}:3: missing_key (no key 'text')",
                              f"{path}:4: not_a_string ('text' is int)"]
    report = s.report()
    assert "wrote 2 documents" in report and "missing_key: 1" in report
    # custom key
    s = convert_text_files([path], tmp_path / "body", text_key="body", progress=False)
    assert docs_of(tmp_path / "body") == ["no text key"]


def test_json_array_and_gz_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x1"}, "x2", {"t": 1}]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('{"text": "y1"}\n{"text": "y2"}\n')
    s = convert_text_files([tmp_path], tmp_path / "out", progress=False)
    assert docs_of(tmp_path / "out") == ["x1", "x2", "y1", "y2"]
    assert s.skipped == {"missing_key": 1} and s.examples == [f"{tmp_path / 'a.json'}:[2]: missing_key (no key 'text')"]


def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["row one", None, "row three 中文", ""], "id": [1, 2, 3, 4]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"content": ["other"]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": pa.array([b"raw bytes", b"\xff"], type=pa.binary())}), tmp_path / "c.parquet")
    s = convert_text_files([tmp_path], tmp_path / "out", progress=False)
    assert docs_of(tmp_path / "out") == ["row one", "row three 中文", "raw bytes"]
    assert s.skipped == {"not_a_string": 1, "empty_document": 1, "missing_key": 1, "invalid_utf8": 1}
    assert f"{tmp_path / 'a.parquet'}:2: not_a_string ('text' is NoneType)" in s.examples
    assert any(e.startswith(f"{tmp_path / 'c.parquet'}:2: invalid_utf8") for e in s.examples)


def test_corrupt_gzip_counted_not_crashing(tmp_path):
    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip at all")
    (tmp_path / "ok.txt").write_text("fine")
    s = convert_text_files([tmp_path], tmp_path / "out", progress=False)
    assert docs_of(tmp_path / "out") == ["fine"] and s.skipped == {"unreadable_file": 1}


def test_overwrite_and_interrupted_conversion(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("alpha")
    convert_text_files([tmp_path / "a.txt"], tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match="out.bin"):
        convert_text_files([tmp_path / "a.txt"], tmp_path / "out", progress=False)

    def boom(*args, **kwargs):
        yield str(tmp_path), "first", None, "", 0
        raise KeyboardInterrupt  # killed half-way

    monkeypatch.setattr(convert, "_text_records", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_text_files([tmp_path / "a.txt"], tmp_path / "new", progress=False)
    with pytest.raises(FileNotFoundError, match="new.meta.json"):
        MemoryMap(tmp_path / "new")
    monkeypatch.undo()
    convert_text_files([tmp_path / "a.txt"], tmp_path / "new", progress=False)  # rerun succeeds
    assert docs_of(tmp_path / "new") == ["alpha"]


def test_unsupported_or_missing_inputs(tmp_path):
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="x.csv"):
        convert_text_files([tmp_path / "x.csv"], tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match="nope"):
        convert_text_files([tmp_path / "nope"], tmp_path / "o", progress=False)


def piece(has_loss, content, **extra):
    return {"has_loss": has_loss, "type": "text", "content": content, **extra}


def test_instruct_strict_validation(tmp_path):
    good = [piece(False, "Q: 2+2?"), piece(True, " A: 4 ✓")]
    records = [
        json.dumps(good, ensure_ascii=False),
        json.dumps({"has_loss": True}),  # not a list
        json.dumps([]),
        json.dumps([piece(1, "x")]),  # int, not bool
        json.dumps([{"has_loss": True, "type": "image", "content": "x"}]),
        json.dumps([{"has_loss": True, "type": "text"}]),
        json.dumps([piece(True, ["x"])]),
        json.dumps([piece(True, "x", extra=1)]),
        json.dumps([piece(False, "no loss anywhere")]),
        "[{bad json",
        json.dumps(["just a string"]),
        json.dumps([piece(True, "second good")]),
    ]
    path = tmp_path / "i.jsonl"
    path.write_text("\n".join(records) + "\n", encoding="utf-8")
    s = convert_instruct_jsonl([path], tmp_path / "out", progress=False)
    assert s.documents_written == 2
    assert s.skipped == {"not_a_list": 1, "empty_record": 1, "bad_has_loss": 1, "bad_type": 1, "missing_key": 1,
                         "bad_content": 1, "unknown_key": 1, "no_loss_piece": 1, "bad_json": 1,
                         "piece_not_an_object": 1}
    assert s.examples[2] == f"{path}:4: bad_has_loss (piece 0: has_loss must be true/false, got 1)"
    mm = MemoryMap(tmp_path / "out")
    assert mm.document_bytes(0) == json.dumps(good, ensure_ascii=False, separators=(",", ":")).encode()
    assert read_instruction_record(mm[0]) == [Piece(False, "Q: 2+2?"), Piece(True, " A: 4 ✓")]
    assert read_instruction_record(mm.document_bytes(1)) == [Piece(True, "second good")]


def test_instruct_json_file_and_reader_errors(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps([piece(True, "single record")]))
    s = convert_instruct_jsonl([tmp_path / "one.json"], tmp_path / "out", progress=False)
    assert s.documents_written == 1 and read_instruction_record(MemoryMap(tmp_path / "out")[0])[0].content == "single record"
    # reference-written documents (raw lines with spaces, extra keys) decode leniently
    assert read_instruction_record(b'[ {"content": "c", "type": "text", "has_loss": true, "x": 0} ]') == [Piece(True, "c")]
    with pytest.raises(InstructionRecordError, match="bad_json"):
        read_instruction_record(b"[{")
    with pytest.raises(InstructionRecordError, match="bad_has_loss"):
        read_instruction_record(b'[{"content": "c", "type": "text", "has_loss": "yes"}]')


def test_main_subcommands_end_to_end(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}. " * 20}) for i in range(30)) + "\nbad\n")
    assert convert.main(["text", str(tmp_path / "a.jsonl"), "-o", str(tmp_path / "c"), "--no-progress",
                         "--align-max-bytes", "300"]) == 0
    out = capsys.readouterr().out
    assert "wrote 30 documents" in out and "bad_json: 1" in out and f"{tmp_path / 'a.jsonl'}:31: bad_json" in out
    assert len(AlignedMemoryMap(tmp_path / "c", 300)) > 0
    assert convert.main(["align", str(tmp_path / "c"), "--max-bytes", "500", "--no-progress"]) == 0
    assert AlignedMemoryMap(tmp_path / "c", 500).item_size(0) <= 500
    (tmp_path / "empty.jsonl").write_text("bad\n")
    assert convert.main(["text", str(tmp_path / "empty.jsonl"), "-o", str(tmp_path / "e"), "--no-progress"]) == 1


@pytest.mark.parametrize("tool", ["prepare_data.py", "align_data.py", "prepare_instruct.py"])
def test_tools_answer_help(tool):
    r = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "--overwrite" in r.stdout


def test_tool_runs_from_repo_root(tmp_path):
    (tmp_path / "i.jsonl").write_text(json.dumps([piece(True, "hi")]) + "\n")
    r = subprocess.run([sys.executable, "tools/prepare_instruct.py", str(tmp_path / "i.jsonl"), "-o",
                        str(tmp_path / "out"), "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote 1 documents" in r.stdout and len(MemoryMap(tmp_path / "out")) == 1
