"""The ``compare:`` section of a compare YAML, and the arms it lists.

A compare YAML is an ordinary trainer config (``model``, ``tokenizer``, ``data``, ``training``,
``parallel``: the *base*, shared by every arm) plus one extra top-level key, ``compare``, which
:func:`load` strips before any arm's :class:`~megatron_tfree.config.Config` is built (``Config`` has
no such section)::

    compare:
      runs_dir: runs/compare_tiny       # one training.save_dir per arm below it, BPE files, caches
      arms:                             # name + config sections merged over the base, per arm
        - {name: tfree-8k, tokenizer: {kind: tfree, vocab_size: 8192, vocab_population: 10}}
        - {name: bpe-64k, tokenizer: {kind: classic, classic_vocab_size: 65536}}
      reference: tfree-8k               # the T-Free arm: bytes are equalised to it ("" = first tfree arm)
      baseline: bpe-64k                 # the paper's "64k vocabulary" ("" = the largest classic arm)
      ...                               # see the dataclasses below

Command-line overrides ``section.key=value`` apply to every arm (after the arm's own sections);
``compare.key=value`` overrides change these settings (e.g. ``compare.threads=2``). The arm sections
are validated when each arm's config is built (:mod:`.arms`); the settings here when loading, with
errors that name the key.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from megatron_tfree.config import ConfigError, apply_overrides, build_section

SECTION = "compare"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Thresholds:
    """When a measured figure confirms a claim (:mod:`.claims`)."""

    params_tolerance: float = 0.01  # |measured embedding+head reduction - 87.5%| <= this (a fraction)
    quality_tolerance: float = 0.10  # "competitive": T-Free bits/byte <= (1 + this) x the best BPE arm's
    fertility_margin: float = 0.0  # "lower fertility": T-Free < (1 - this) x the baseline's, per language
    memory_margin: float = 0.0  # "lower peak memory": T-Free < (1 - this) x the baseline's


@dataclass
class EvalSettings:
    """The held-out evaluation of every arm (:mod:`.heldout`, :mod:`.lm_eval_run`)."""

    passages: int = 24  # fixed held-out passages, evenly spread over the valid split
    passage_bytes: int = 400  # at most this many bytes each, cut at line ends (must fit every arm's seq_len)
    prompts: list[str] = field(default_factory=lambda: ["ROMEO:", "To be, or not to be", "The king"])
    generation_words: int = 24  # greedy units for the reference arm; other arms in proportion to their seq_len
    lm_eval_tasks: list[str] = field(default_factory=lambda: ["hamlet_ppl", "hamlet_cloze"])
    lm_eval_include: str = "examples/lm_eval"  # task YAMLs (their data paths are relative to the repository root)
    lm_eval_limit: int = 0  # documents per task (0 = all)


@dataclass
class PlannerSettings:
    """The planner's memory per GPU for a large config at both vocabularies (:mod:`.planner`)."""

    config: str = "configs/1b.yaml"
    nodes: int = 8
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    bpe_vocab_size: int = 65536


@dataclass
class CompareSettings:
    """Everything of the ``compare:`` section except the arms (see the module docstring)."""

    runs_dir: str = "runs/compare"
    reference: str = ""
    baseline: str = ""
    equalise: Literal["bytes", "none"] = "bytes"  # bytes: each other arm's data.seq_len from its bytes per unit
    threads: int = 0  # torch threads per training process (0: torch's default; 1 avoids oversubscribing a busy machine)
    isolate: bool = True  # train each arm in its own process (its peak memory measured alone)
    bpe_preset: str = "gpt4"  # toklab pre-tokenisation preset of the BPE arms
    bpe_min_frequency: int = 2
    probe: str = "multilingual"  # toklab corpus SPEC of the multilingual probe
    collision_words: int = 2000  # T-Free id-set collisions among the training split's most frequent words
    eval: EvalSettings = field(default_factory=EvalSettings)
    planner: PlannerSettings = field(default_factory=PlannerSettings)
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass
class ArmSpec:
    """One arm as written in the YAML: a name and config sections merged over the base config."""

    name: str
    sections: dict[str, Any]


@dataclass
class CompareConfig:
    """A loaded compare YAML: the settings, the arms, the base config dict (overrides not yet applied)
    and the overrides that apply to every arm."""

    settings: CompareSettings
    arms: list[ArmSpec]
    base: dict[str, Any]
    overrides: list[str]
    source: str

    def arm(self, name: str) -> ArmSpec:
        for a in self.arms:
            if a.name == name:
                return a
        names = ", ".join(a.name for a in self.arms)
        raise ConfigError(f"{self.source}: compare: no arm named {name!r} (arms: {names})")


def _arms(raw: Any, source: str) -> list[ArmSpec]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: compare.arms must be a non-empty list of {{name: ..., <section>: {{...}}}}")
    arms, seen = [], set()
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{source}: compare.arms[{i}] must be a mapping with a name")
        name = entry["name"]
        if not _NAME.match(name) or name in seen:
            raise ConfigError(f"{source}: compare.arms[{i}].name {name!r} must be unique and a plain directory name")
        seen.add(name)
        sections = {k: copy.deepcopy(v) for k, v in entry.items() if k != "name"}
        for key, value in sections.items():
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: compare.arms[{i}].{key} must be a config section (a mapping)")
        arms.append(ArmSpec(name, sections))
    return arms


def load(path: str | Path, overrides: Optional[list[str]] = None) -> CompareConfig:
    """Read a compare YAML; ``overrides`` starting with ``compare.`` patch the settings, the others are
    kept to be applied to every arm."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    source = str(p)
    mine = [o for o in overrides or [] if o.strip().startswith(SECTION + ".")]
    others = [o for o in overrides or [] if o not in mine]
    section = data.pop(SECTION, None)
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: needs a `{SECTION}:` section listing the arms "
                          "(see megatron_tfree/compare/settings.py)")
    wrapped = apply_overrides({SECTION: section}, mine)[SECTION]
    arms = _arms(wrapped.pop("arms", None), source)
    settings = build_section(CompareSettings, wrapped, prefix=f"{SECTION}.", source=source)
    _validate(settings, source)
    cc = CompareConfig(settings, arms, data, others, source)
    for name in (settings.reference, settings.baseline):
        if name:
            cc.arm(name)
    return cc


def _validate(s: CompareSettings, source: str) -> None:
    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: compare.{key} {msg}")

    if not s.runs_dir:
        bad("runs_dir", "must not be empty")
    if s.threads < 0:
        bad("threads", f"must be >= 0 (0 = torch's default), got {s.threads}")
    e = s.eval
    for name in ("passages", "passage_bytes", "generation_words"):
        if getattr(e, name) <= 0:
            bad(f"eval.{name}", f"must be > 0, got {getattr(e, name)}")
    if e.lm_eval_limit < 0:
        bad("eval.lm_eval_limit", f"must be >= 0 (0 = all documents), got {e.lm_eval_limit}")
    if s.collision_words <= 1:
        bad("collision_words", f"must be > 1, got {s.collision_words}")
    t = s.thresholds
    for name in ("params_tolerance", "quality_tolerance", "fertility_margin", "memory_margin"):
        if not 0.0 <= getattr(t, name) < 1.0:
            bad(f"thresholds.{name}", f"must be in [0, 1), got {getattr(t, name)}")
