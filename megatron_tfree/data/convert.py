"""Converters: raw text / JSONL / JSON / Parquet -> MemoryMap, MemoryMap -> aligned index, and
instruction JSONL -> MemoryMap; plus the command lines behind ``tools/*.py`` and
``megatron-tfree-prepare-data``.

Bad input never crashes a conversion and never vanishes silently: every skipped record (undecodable
UTF-8, bad JSON, missing key, wrong type, empty document, ...) is counted by reason in the returned
:class:`ConversionSummary`, with ``file:line`` of the first few, and the CLIs print that summary.
Output is written through :class:`MemoryMapBuilder`, so an interrupted conversion leaves nothing a
reader accepts and a re-run succeeds.

Instruction data: a JSONL line is a list of ``{"has_loss": bool, "type": "text", "content": str}``
pieces. Valid records are stored one per document as compact UTF-8 JSON; decode them with
:func:`read_instruction_record`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from tqdm import tqdm

from .aligned import AlignedMemoryMap, build_aligned_index
from .instruct import (  # re-exported: the dataset decodes records with convert.read_instruction_record
    InstructionRecordError,
    Piece,
    encode_instruction_record,
    parse_instruction_pieces,
    read_instruction_record,
)
from .memory_map import MemoryMapBuilder, PathLike

__all__ = [
    "ConversionSummary", "InstructionRecordError", "Piece", "align_memory_map", "convert_instruct_jsonl",
    "convert_text_files", "encode_instruction_record", "find_input_files", "main", "parse_instruction_pieces",
    "read_instruction_record", "run",
]

TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json", ".parquet")
INSTRUCT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
SPLIT_MODES = ("file", "lines", "blank_lines")
MAX_EXAMPLES = 10

# ---------------------------------------------------------------------------------------------
# summary and input discovery


@dataclass
class ConversionSummary:
    """What a conversion did: documents written, and skipped records by reason (with examples)."""

    output: str
    files: int = 0
    documents_written: int = 0
    bytes_written: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: list[str] = field(default_factory=list)  # "file:line: reason (detail)", first few
    repaired: Counter = field(default_factory=Counter)  # reason -> documents written after a repair

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, where: str, detail: str = "", count: int = 1) -> None:
        """Count ``count`` skipped records of ``reason`` at ``where`` (``file:line``)."""
        self.skipped[reason] += count
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    def report(self) -> str:
        """Human-readable multi-line summary."""
        lines = [f"wrote {self.documents_written} documents ({self.bytes_written} bytes) from "
                 f"{self.files} files to {self.output}", f"skipped {self.total_skipped} records"]
        lines += [f"  {reason}: {n}" for reason, n in sorted(self.skipped.items())]
        lines += [f"repaired and kept {n} documents: {reason}" for reason, n in sorted(self.repaired.items())]
        if self.examples:
            lines.append("first skipped or repaired:")
            lines += [f"  {e}" for e in self.examples]
        return "\n".join(lines)


def find_input_files(inputs: Sequence[PathLike], suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[Path]:
    """Files named in ``inputs``; directories are searched recursively (sorted) for ``suffixes``."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(tuple(suffixes)))
        elif p.is_file():
            if not p.name.endswith(tuple(suffixes)):
                raise ValueError(f"{p}: unsupported file type (expected one of {', '.join(suffixes)})")
            found.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return found


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


# ---------------------------------------------------------------------------------------------
# record readers: each yields (where, text or None, reason or None, detail, source bytes consumed)

Record = tuple[str, Optional[str], Optional[str], str, int]


def _decode(raw: bytes, path: Path, first_line: int, invalid_utf8: str = "skip") -> tuple[Optional[str], str, str]:
    """``(text, where, detail)``; text is None for invalid UTF-8 (``invalid_utf8="skip"``) and where points at
    the bad line; with ``"replace"`` the bad bytes become U+FFFD and detail starts with ``replaced``."""
    try:
        return raw.decode("utf-8"), f"{path}:{first_line}", ""
    except UnicodeDecodeError as e:
        line = first_line + raw[: e.start].count(b"\n")
        if invalid_utf8 == "replace":
            return raw.decode("utf-8", errors="replace"), f"{path}:{line}", f"replaced invalid UTF-8 (byte 0x{raw[e.start]:02x})"
        return None, f"{path}:{line}", f"byte 0x{raw[e.start]:02x}"


def _strip_eol(raw: bytes) -> bytes:
    return raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw


def _read_text(path: Path, split: str, invalid_utf8: str = "skip") -> Iterator[Record]:
    """Plain text: the whole file, each line, or each blank-line separated paragraph."""
    if split == "file":
        with _open_binary(path) as f:
            raw = f.read()
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        text, where, detail = _decode(raw, path, 1, invalid_utf8)
        yield (where, text, None if text is not None else "invalid_utf8", detail, len(raw))
        return
    para: list[bytes] = []
    para_line = 0

    def flush() -> Iterator[Record]:
        raw = _strip_eol(b"".join(para))
        text, where, detail = _decode(raw, path, para_line, invalid_utf8)
        yield (where, text, None if text is not None else "invalid_utf8", detail, 0)

    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            blank = not raw.strip()
            if split == "lines":
                if blank:
                    yield (f"{path}:{lineno}", None, "blank_line", "", len(raw))
                    continue
                text, where, detail = _decode(_strip_eol(raw), path, lineno, invalid_utf8)
                yield (where, text, None if text is not None else "invalid_utf8", detail, len(raw))
            elif blank:
                if para:
                    yield from flush()
                    para = []
                yield (f"{path}:{lineno}", None, None, "", len(raw))  # separator: progress only
            else:
                if not para:
                    para_line = lineno
                para.append(raw)
                yield (f"{path}:{lineno}", None, None, "", len(raw))
        if para:
            yield from flush()


def _record_text(obj, key: str) -> tuple[Optional[str], Optional[str], str]:
    """``(text, reason, detail)`` of one JSON record (an object with ``key``, or a bare string)."""
    if isinstance(obj, str):
        return obj, None, ""
    if not isinstance(obj, dict):
        return None, "not_an_object", f"got {type(obj).__name__}"
    if key not in obj:
        return None, "missing_key", f"no key {key!r}"
    value = obj[key]
    if not isinstance(value, str):
        return None, "not_a_string", f"{key!r} is {type(value).__name__}"
    return value, None, ""


def _read_jsonl_lines(path: Path) -> Iterator[tuple[str, object, Optional[str], str, int]]:
    """Parsed JSON lines: ``(where, obj, reason, detail, nbytes)``; reason set when unparsable."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                yield where, None, "blank_line", "", len(raw)
                continue
            text, _, detail = _decode(_strip_eol(raw), path, lineno)
            if text is None:
                yield where, None, "invalid_utf8", detail, len(raw)
                continue
            try:
                yield where, json.loads(text), None, "", len(raw)
            except json.JSONDecodeError as e:
                yield where, None, "bad_json", e.msg, len(raw)


_PROGRESS = object()  # yielded as a record to report bytes consumed only


def _read_json_records(path: Path, list_is_record: bool = False) -> Iterator[tuple[str, object, Optional[str], str, int]]:
    """A ``.json`` file: a JSON array of records, one record, or (if not one JSON value) JSONL.

    ``list_is_record``: a top-level list whose first element is not a list is one record
    (instruction data, where a record is itself a list of piece objects).
    """
    if not path.name.endswith(".json"):
        yield from _read_jsonl_lines(path)
        return
    raw = path.read_bytes()
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        yield from _read_jsonl_lines(path)
        return
    items = value if isinstance(value, list) else [value]
    if list_is_record and isinstance(value, list) and (not value or not isinstance(value[0], list)):
        items = [value]
    for i, obj in enumerate(items):
        yield f"{path}:[{i}]", obj, None, "", 0
    yield f"{path}", _PROGRESS, None, "", len(raw)


def _read_json_text(path: Path, key: str) -> Iterator[Record]:
    for where, obj, reason, detail, nbytes in _read_json_records(path):
        if obj is _PROGRESS:
            yield where, None, None, "", nbytes
        elif reason is not None:
            yield where, None, reason, detail, nbytes
        else:
            text, reason, detail = _record_text(obj, key)
            yield where, text, reason, detail, nbytes


def _read_parquet(path: Path, key: str, invalid_utf8: str = "skip") -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if key not in pf.schema_arrow.names:
        yield (f"{path}:1", None, "missing_key", f"no column {key!r} in {pf.metadata.num_rows} rows (columns: "
               f"{', '.join(pf.schema_arrow.names)})", 0)
        return
    row = 0
    for batch in pf.iter_batches(columns=[key], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            where = f"{path}:{row}"
            if isinstance(value, (bytes, bytearray)):
                text, where, detail = _decode(bytes(value), path, row, invalid_utf8)
                yield where, text, None if text is not None else "invalid_utf8", detail, 0
            elif isinstance(value, str):
                yield where, value, None, "", 0
            else:
                yield where, None, "not_a_string", f"{key!r} is {type(value).__name__}", 0


def _text_records(path: Path, text_key: str, split: str, invalid_utf8: str = "skip") -> Iterator[Record]:
    name = path.name
    if name.endswith(".parquet"):
        return _read_parquet(path, text_key, invalid_utf8)
    if name.endswith((".jsonl", ".jsonl.gz", ".json")):
        return _read_json_text(path, text_key)
    return _read_text(path, split, invalid_utf8)


# ---------------------------------------------------------------------------------------------
# the conversion loop


def _convert(files: list[Path], prefix: PathLike, records, overwrite: bool, progress: bool) -> ConversionSummary:
    """Write the documents produced by ``records(path)`` for each file; count everything skipped."""
    summary = ConversionSummary(output=str(prefix), files=len(files))
    total = sum(f.stat().st_size for f in files)
    with MemoryMapBuilder(prefix, overwrite=overwrite) as builder, \
            tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar:
        for path in files:
            done, size = 0, path.stat().st_size
            try:
                for where, text, reason, detail, nbytes in records(path):
                    if nbytes and done + nbytes <= size:
                        bar.update(nbytes)
                        done += nbytes
                    if reason is not None:
                        summary.skip(reason, where, detail)
                        continue
                    if text is None:
                        continue
                    if text == "":
                        summary.skip("empty_document", where)
                        continue
                    if detail.startswith("replaced"):
                        summary.repaired["invalid_utf8_replaced"] += 1
                        if len(summary.examples) < MAX_EXAMPLES:
                            summary.examples.append(f"{where}: {detail}")
                    try:
                        data = text.encode("utf-8")
                    except UnicodeEncodeError as e:  # lone surrogates from JSON "\ud800" escapes
                        summary.skip("invalid_unicode", where, e.reason)
                        continue
                    builder.add(data)
                    summary.documents_written += 1
                    summary.bytes_written += len(data)
            except (OSError, EOFError, ValueError) as e:  # corrupt gzip / parquet: keep what was read
                summary.skip("unreadable_file", str(path), f"{type(e).__name__}: {e}")
            bar.update(size - done)
            bar.set_postfix(docs=summary.documents_written, skipped=summary.total_skipped, refresh=False)
        if summary.documents_written == 0:
            builder.abort()  # an empty map would look complete and block the corrected re-run
    return summary


def convert_text_files(inputs: Sequence[PathLike], prefix: PathLike, text_key: str = "text", split: str = "file",
                       overwrite: bool = False, progress: bool = True, invalid_utf8: str = "skip") -> ConversionSummary:
    """Convert text/JSONL/JSON/Parquet files or directories (recursively) into a UTF-8 MemoryMap.

    Args:
        inputs: files and/or directories (``.txt``, ``.jsonl``, ``.json``, ``.parquet``, ``.txt.gz``,
            ``.jsonl.gz``); directories are searched recursively in sorted order.
        prefix: output MemoryMap prefix.
        text_key: field (JSON) or column (Parquet) holding the document text.
        split: plain text only: ``"file"`` (one document per file, verbatim), ``"lines"`` or
            ``"blank_lines"`` (paragraphs).
        overwrite: replace an existing MemoryMap at ``prefix``.
        progress: show a tqdm progress bar.
        invalid_utf8: plain text and Parquet bytes: ``"skip"`` a document with invalid UTF-8 (counted), or
            ``"replace"`` the bad bytes with U+FFFD and keep it (counted as repaired).

    A conversion that writes no document leaves nothing behind (an empty map would block the re-run).
    """
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {SPLIT_MODES}, got {split!r}")
    if invalid_utf8 not in ("skip", "replace"):
        raise ValueError(f"invalid_utf8 must be 'skip' or 'replace', got {invalid_utf8!r}")
    files = find_input_files(inputs, TEXT_SUFFIXES)
    return _convert(files, prefix, lambda p: _text_records(p, text_key, split, invalid_utf8), overwrite, progress)


def align_memory_map(prefix: PathLike, max_bytes: int = 20000, overwrite: bool = False,
                     progress: bool = True) -> AlignedMemoryMap:
    """Build the aligned index of a text MemoryMap (see :mod:`megatron_tfree.data.aligned`)."""
    return build_aligned_index(prefix, max_bytes, overwrite=overwrite, progress=progress)


# ---------------------------------------------------------------------------------------------
# instruction data


def _instruct_records(path: Path) -> Iterator[Record]:
    for where, obj, reason, detail, nbytes in _read_json_records(path, list_is_record=True):
        if reason is not None or obj is _PROGRESS:
            yield where, None, reason, detail, nbytes
            continue
        try:
            pieces = parse_instruction_pieces(obj, strict=True)
            encode_instruction_record(pieces)  # surrogates would fail here
        except InstructionRecordError as e:
            yield where, None, e.reason, e.detail, nbytes
            continue
        except UnicodeEncodeError as e:
            yield where, None, "invalid_unicode", e.reason, nbytes
            continue
        yield where, encode_instruction_record(pieces).decode("utf-8"), None, "", nbytes


def convert_instruct_jsonl(inputs: Sequence[PathLike], prefix: PathLike, overwrite: bool = False,
                           progress: bool = True) -> ConversionSummary:
    """Convert instruction JSONL files/directories into a MemoryMap of validated records."""
    files = find_input_files(inputs, INSTRUCT_SUFFIXES)
    return _convert(files, prefix, _instruct_records, overwrite, progress)


# ---------------------------------------------------------------------------------------------
# command lines


def add_text_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("inputs", nargs="+", help="files or directories (.txt, .jsonl, .json, .parquet, .txt.gz, .jsonl.gz)")
    p.add_argument("-o", "--output", required=True, help="output MemoryMap prefix (writes PREFIX.bin/.idx/.meta.json)")
    p.add_argument("--text-key", default="text", help="JSON field / Parquet column with the text (default: text)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--split-lines", action="store_true", help="plain text: one document per line")
    mode.add_argument("--split-blank-lines", action="store_true", help="plain text: documents separated by blank lines")
    p.add_argument("--align-max-bytes", type=int, default=0, help="also build the aligned index for this max_bytes")
    p.add_argument("--invalid-utf8", choices=("skip", "replace"), default="skip",
                   help="a document with invalid UTF-8 (plain text, Parquet bytes): skip it (default) or replace the "
                        "bad bytes with U+FFFD and keep it; counted either way")
    _common(p)
    return p


def add_align_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("prefix", help="MemoryMap prefix of a UTF-8 text corpus")
    p.add_argument("--max-bytes", type=int, default=20000, help="item size in bytes (default: 20000)")
    _common(p)
    return p


def add_instruct_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("inputs", nargs="+", help="instruction .jsonl/.jsonl.gz/.json files or directories")
    p.add_argument("-o", "--output", required=True, help="output MemoryMap prefix")
    _common(p)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")


def _finish(summary: ConversionSummary) -> int:
    print(summary.report())
    if summary.documents_written == 0:
        print(f"error: no documents were written (nothing was created at {summary.output})", file=sys.stderr)
        return 1
    return 0


def run_text(args: argparse.Namespace) -> int:
    split = "lines" if args.split_lines else "blank_lines" if args.split_blank_lines else "file"
    summary = convert_text_files(args.inputs, args.output, text_key=args.text_key, split=split,
                                 overwrite=args.overwrite, progress=not args.no_progress, invalid_utf8=args.invalid_utf8)
    rc = _finish(summary)
    if rc == 0 and args.align_max_bytes:
        am = align_memory_map(args.output, args.align_max_bytes, overwrite=args.overwrite, progress=not args.no_progress)
        print(f"aligned index: {len(am)} items of <= {args.align_max_bytes} bytes")
    return rc


def run_align(args: argparse.Namespace) -> int:
    am = align_memory_map(args.prefix, args.max_bytes, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"aligned index {am.path_idx}: {len(am)} items, {am.segment_count} segments, "
          f"{len(am.memory_map)} documents, {am.memory_map.total_size} bytes")
    return 0


def run_instruct(args: argparse.Namespace) -> int:
    return _finish(convert_instruct_jsonl(args.inputs, args.output, overwrite=args.overwrite,
                                          progress=not args.no_progress))


COMMANDS = {
    "text": (add_text_arguments, run_text, "text/JSONL/JSON/Parquet -> MemoryMap of UTF-8 documents"),
    "align": (add_align_arguments, run_align, "MemoryMap -> aligned index (items of ~max_bytes)"),
    "instruct": (add_instruct_arguments, run_instruct, "instruction JSONL -> MemoryMap of validated records"),
}


def parser_for(command: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """A standalone parser for one sub-command (used by the ``tools/`` wrappers)."""
    add, _, help_text = COMMANDS[command]
    return add(argparse.ArgumentParser(prog=prog, description=help_text))


def _run(command: str, args: argparse.Namespace, prog: str) -> int:
    """Run ``command``; an expected problem (missing input, existing output, bad data) is one line, code 2."""
    from ..errors import EXPECTED_ERRORS, report

    try:
        return COMMANDS[command][1](args)
    except EXPECTED_ERRORS + (ValueError,) as e:
        return report(prog, e)


def run(command: str, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Parse ``argv`` for ``command`` and run it; returns the exit code."""
    args = parser_for(command, prog).parse_args(argv)
    return _run(command, args, prog or command)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``megatron-tfree-prepare-data {text,align,instruct} ...``"""
    parser = argparse.ArgumentParser(prog="megatron-tfree-prepare-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_text) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return _run(args.command, args, parser.prog)


if __name__ == "__main__":
    sys.exit(main())
