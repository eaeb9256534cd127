"""Word counts on disk for the decode dictionary: JSON ``{"word": count}`` or TSV, never pickle by default.

TSV: one ``word<TAB>count`` per line, blank lines skipped; in the word ``\\n``, ``\\t`` and ``\\\\`` stand
for a newline, a tab and a backslash (words such as ``<|\\n|>`` contain a real newline). Errors name
the file and the line (TSV) or key (JSON). Pickle (``.pkl``/``.pickle``) only with ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any, Mapping

_TSV_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}


def _unescape_tsv(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        two = text[i : i + 2]
        if two in _TSV_ESCAPES:
            out.append(_TSV_ESCAPES[two])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _escape_tsv(word: str) -> str:
    return word.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def _check_count(count: Any, where: str) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, float)) or not math.isfinite(count) or count < 0 \
            or int(count) != count:
        raise ValueError(f"{where}: count must be a non-negative integer, got {count!r}")
    return int(count)


def read_word_counts(path: str | Path, allow_pickle: bool = False) -> dict[str, int]:
    """``{word: count}`` from a ``.json`` object, a TSV file (any other suffix: ``word<TAB>count`` lines,
    blank lines skipped) or, only with ``allow_pickle=True``, a ``.pkl``/``.pickle`` dict or Counter.
    Errors name the file and the key or line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word counts file {path} does not exist")
    if path.suffix in (".pkl", ".pickle"):
        if not allow_pickle:
            raise ValueError(f"{path}: refusing to unpickle (pickle can run arbitrary code); convert it to "
                             f"JSON/TSV or pass allow_pickle=True (--allow-pickle) if you trust the file")
        with open(path, "rb") as f:
            data = pickle.load(f)  # noqa: S301 - explicit opt-in above
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: the pickle holds a {type(data).__name__}, not a word -> count mapping")
        return {str(w): _check_count(c, f"{path}: key {w!r}") for w, c in data.items()}
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{\"word\": count}}, got {type(data).__name__}")
        out = {}
        for w, c in data.items():
            if not w:
                raise ValueError(f"{path}: key {w!r}: the empty string is not a word")
            out[w] = _check_count(c, f"{path}: key {w!r}")
        return out
    out: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0]:
                raise ValueError(f"{path}:{lineno}: expected 'word<TAB>count', got {line!r}")
            try:
                count = int(parts[1])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: count {parts[1]!r} is not an integer") from None
            word = _unescape_tsv(parts[0])
            out[word] = out.get(word, 0) + _check_count(count, f"{path}:{lineno}")
    return out


def write_word_counts(path: str | Path, counts: Mapping[str, int]) -> None:
    """Write ``counts`` as JSON (``.json``) or escaped TSV (any other suffix)."""
    path = Path(path)
    if path.suffix == ".json":
        path.write_text(json.dumps(dict(counts), ensure_ascii=False), encoding="utf-8")
    else:
        path.write_text("".join(f"{_escape_tsv(w)}\t{int(c)}\n" for w, c in counts.items()), encoding="utf-8")


__all__ = ["read_word_counts", "write_word_counts"]
