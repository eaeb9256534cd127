"""Small file helpers shared by every floor of the package."""

from __future__ import annotations

import os


def default_permissions(path: str | os.PathLike) -> None:
    """Give a file the mode a plain ``open(path, "w")`` would (``0o666`` minus the umask): some writers
    (``safetensors``) create files readable by their owner only."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
