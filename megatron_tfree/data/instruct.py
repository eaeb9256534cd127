"""Instruction (finetuning) records: validation, compact storage and decoding.

A record is a JSON list of pieces ``{"has_loss": bool, "type": "text", "content": str}`` (spec
section 5). The converter validates every JSONL line strictly and stores each valid record as
compact UTF-8 JSON (keys in that order) in one MemoryMap document; the dataset decodes a document
with :func:`read_instruction_record`. Reference-written instruction maps (the raw JSONL line per
document) decode too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Piece:
    """One piece of an instruction record; ``has_loss`` pieces are trained on."""

    has_loss: bool
    content: str
    type: str = "text"


class InstructionRecordError(ValueError):
    """An instruction record is malformed; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


PIECE_KEYS = ("has_loss", "type", "content")


def parse_instruction_pieces(obj, strict: bool = True) -> list[Piece]:
    """Validate a decoded JSON record (a list of piece objects) and return its pieces.

    ``strict`` (used by the converter) also rejects unknown keys and records without any
    ``has_loss`` piece (they would contribute nothing to training).
    """
    if not isinstance(obj, list):
        raise InstructionRecordError("not_a_list", f"expected a JSON list of pieces, got {type(obj).__name__}")
    if not obj:
        raise InstructionRecordError("empty_record", "no pieces")
    pieces = []
    for j, p in enumerate(obj):
        if not isinstance(p, dict):
            raise InstructionRecordError("piece_not_an_object", f"piece {j} is {type(p).__name__}")
        missing = [k for k in PIECE_KEYS if k not in p]
        if missing:
            raise InstructionRecordError("missing_key", f"piece {j} has no {missing[0]!r}")
        extra = sorted(set(p) - set(PIECE_KEYS))
        if strict and extra:
            raise InstructionRecordError("unknown_key", f"piece {j} has unknown key {extra[0]!r}")
        if not isinstance(p["has_loss"], bool):
            raise InstructionRecordError("bad_has_loss", f"piece {j}: has_loss must be true/false, got {p['has_loss']!r}")
        if p["type"] != "text":
            raise InstructionRecordError("bad_type", f"piece {j}: type must be 'text', got {p['type']!r}")
        if not isinstance(p["content"], str):
            raise InstructionRecordError("bad_content", f"piece {j}: content must be a string, got {type(p['content']).__name__}")
        pieces.append(Piece(has_loss=p["has_loss"], content=p["content"], type="text"))
    if strict and not any(p.has_loss for p in pieces):
        raise InstructionRecordError("no_loss_piece", "no piece has has_loss=true")
    return pieces


def encode_instruction_record(pieces: Sequence[Piece]) -> bytes:
    """Compact UTF-8 JSON of ``pieces`` (the stored document format)."""
    data = [{"has_loss": p.has_loss, "type": p.type, "content": p.content} for p in pieces]
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def read_instruction_record(data, strict: bool = False) -> list[Piece]:
    """Decode one stored instruction document (bytes, memoryview or uint8 array) into pieces."""
    raw = data.tobytes() if hasattr(data, "tobytes") else bytes(data)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InstructionRecordError("bad_json", str(e)) from e
    return parse_instruction_pieces(obj, strict=strict)
