"""Inference: decode-dictionary generation (:class:`InferencePipe`) and bits per byte (:mod:`.bpb`)."""

from .pipe import InferencePipe

__all__ = ["InferencePipe"]
