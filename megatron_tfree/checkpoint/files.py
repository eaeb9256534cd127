"""Names and layout of a checkpoint on disk, the ``latest`` pointer, tag resolution, atomic small files.

A *run directory* (``training.save_dir``)::

    latest                       text: the tag of the newest *complete* checkpoint (e.g. "step_200")
    step_200/                    one *tag directory* per checkpoint
        config.yaml              the resolved Config
        tokenizer/               tokenizer.save(...)
        trainer_state.json       step, consumed_samples, skipped_steps, metrics_position, world_size
        rng_state_rank{r}.json   python / numpy / torch (/ cuda) RNG states of rank r
        word_counts.json         target words seen in training so far (all ranks summed)
        decode_dictionary.*      T-Free: the precomputed decode dictionary (tools/generate_tokenizer.py)
        ... DeepSpeed's files (:mod:`.deepspeed_files`) or the layout-free ones (:mod:`.consolidated`)
    metrics.jsonl, loss.png, tensorboard/

Every place that accepts "a checkpoint" (resume, inference, conversion, export) resolves it with
:func:`resolve_tag_dir`: a run directory means its ``latest`` tag, anything else must itself be a tag
directory (it holds ``config.yaml``). Our own files are JSON/YAML, written atomically (temp file +
fsync + ``os.replace``), so a reader never sees half a file and nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

LATEST_FILE = "latest"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
STATE_FILE = "trainer_state.json"
WORD_COUNTS_FILE = "word_counts.json"
DICTIONARY_NAME = "decode_dictionary"  # .safetensors + .json


def tag_for(step: int) -> str:
    return f"step_{step}"


def step_of(tag: str) -> Optional[int]:
    """The step of a ``step_N`` tag (None for other names)."""
    head, _, number = tag.partition("_")
    return int(number) if head == "step" and number.isdigit() else None


def complete_tags(save_dir: str | os.PathLike) -> list[str]:
    """The ``step_N`` tags of ``save_dir`` whose trainer state was written (complete saves), newest first."""
    root = Path(save_dir)
    tags = [p.name for p in root.glob("step_*") if step_of(p.name) is not None and (p / STATE_FILE).is_file()]
    return sorted(tags, key=step_of, reverse=True)


def unreadable(tag_dir: str | os.PathLike) -> Optional[str]:
    """Why the checkpoint ``tag_dir`` cannot be loaded (a file named), or None when every file opens:
    our JSON/YAML files parse, every ``.pt`` file opens with ``torch.load(weights_only=True)``
    (memory-mapped: the archive and its index are checked, the tensor bytes not read)."""
    from .safe_load import load_weights_only

    tag_dir = Path(tag_dir)
    for name in (CONFIG_FILE, STATE_FILE):
        if not (tag_dir / name).is_file():
            return f"{tag_dir / name} is missing"
    for path in sorted(tag_dir.glob("*.json")):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return f"{path}: {e}"
    try:
        yaml.safe_load((tag_dir / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError) as e:
        return f"{tag_dir / CONFIG_FILE}: {str(e).splitlines()[0]}"
    for path in sorted(tag_dir.glob("*.pt")):
        try:
            load_weights_only(path, mmap=True)
        except (OSError, ValueError) as e:
            return str(e) if str(path) in str(e) else f"{path}: {e}"
    return None


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.json"


@dataclass
class TrainerState:
    """Counters that, with the engine state, make a resumed run continue exactly (``trainer_state.json``)."""

    step: int = 0  # optimizer steps taken (including skipped ones)
    consumed_samples: int = 0  # global data position (all data-parallel ranks together)
    skipped_steps: int = 0  # steps skipped because of a non-finite loss
    metrics_position: int = 0  # byte length of metrics.jsonl at save time
    world_size: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainerState":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def read(cls, tag_dir: str | os.PathLike) -> "TrainerState":
        path = Path(tag_dir) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {tag_dir} is incomplete: {STATE_FILE} is missing")
        return cls.from_dict(json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------------
# atomic small files
# --------------------------------------------------------------------------------------------------


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + fsync + os.replace (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_atomic(path, json.dumps(data, ensure_ascii=False))


# --------------------------------------------------------------------------------------------------
# latest and tag resolution
# --------------------------------------------------------------------------------------------------


def read_latest(save_dir: str | os.PathLike) -> Optional[str]:
    """The tag in ``{save_dir}/latest``, or None when there is no complete checkpoint."""
    path = Path(save_dir) / LATEST_FILE
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag or None


def write_latest(save_dir: str | os.PathLike, tag: str) -> None:
    write_atomic(Path(save_dir) / LATEST_FILE, tag + "\n")


def is_tag_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one checkpoint (a tag, consolidated or imported directory: it holds ``config.yaml``)."""
    return (Path(path) / CONFIG_FILE).is_file()


def resolve_tag_dir(path: str | os.PathLike) -> Path:
    """The tag directory ``path`` stands for: ``path/<tag in latest>`` for a run directory, else ``path``
    itself, which must be a checkpoint directory. Errors name what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    latest = path / LATEST_FILE
    if latest.is_file():
        tag = read_latest(path)
        if tag is None:
            raise ValueError(f"{latest} is empty")
        tag_dir = path / tag
        if not tag_dir.is_dir():
            raise FileNotFoundError(f"{latest} names {tag!r} but {tag_dir} does not exist")
        if not is_tag_dir(tag_dir):
            raise FileNotFoundError(f"{latest} names {tag!r} but {tag_dir} is incomplete (no {CONFIG_FILE})")
        return tag_dir
    if not is_tag_dir(path):
        raise FileNotFoundError(f"{path} is neither a save dir (no '{LATEST_FILE}' file) nor a checkpoint tag "
                                f"directory (no {CONFIG_FILE})")
    return path


def dictionary_path(tag_dir: str | os.PathLike) -> Path:
    """Where the precomputed decode dictionary of a checkpoint lives (``.safetensors`` + ``.json``)."""
    return Path(tag_dir) / f"{DICTIONARY_NAME}.safetensors"


def has_dictionary(tag_dir: str | os.PathLike) -> bool:
    p = dictionary_path(tag_dir)
    return p.is_file() and p.with_suffix(".json").is_file()


# --------------------------------------------------------------------------------------------------
# output directories written atomically
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False, flag: str = "overwrite=True") -> Iterator[Path]:
    """A temporary sibling directory to fill, renamed to ``out`` when the block ends without an error
    (removed otherwise): readers see no ``out`` or a complete one, never half of it. An existing
    ``out`` is an error unless ``overwrite`` (``flag`` names the option in the message); it is then
    moved aside, replaced, and removed."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass {flag} to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
