"""The arms of a comparison as trainer configs: same corpus, same non-embedding architecture, same number
of optimizer steps, about the same number of text bytes per step.

Each arm's config is the base config, then the arm's own sections, then the command-line overrides (which
apply to every arm), then what the comparison sets itself: ``training.save_dir = RUNS_DIR/{arm}``, the
corpus (``data.prefix_paths`` / ``data.valid_prefix_paths``), a BPE arm's ``tokenizer.tokenizer_file``
and, with ``compare.equalise: bytes``, ``data.seq_len``.

**Equal bytes.** A T-Free position is a word, a BPE position a token, so equal ``steps x micro batch x
seq_len`` would train on different amounts of text. The reference (T-Free) arm keeps ``data.seq_len``;
every other arm gets ``round(seq_len_ref x b_ref / b_arm)``, ``b`` being the bytes per unit each tokenizer
gives on the train split (measured by the tokenizer lab, :mod:`.tokstats`), so a batch holds about the
same bytes. The bytes actually trained are then counted from the real batches (:mod:`.trained`) and
reported beside each arm.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_tfree.config import Config, ConfigError, apply_overrides

from .settings import CompareConfig


@dataclass
class Arm:
    name: str
    cfg: Config  # draft (before :func:`finalise`) or final
    role: str  # "reference" (the T-Free arm bytes are equalised to), "baseline" (the paper's 64k), or ""

    @property
    def kind(self) -> str:
        return self.cfg.tokenizer.kind

    @property
    def nominal_vocab(self) -> int:
        """The vocabulary asked for: T-Free ``v``, BPE ``classic_vocab_size`` (a small corpus may give fewer)."""
        t = self.cfg.tokenizer
        return t.vocab_size if t.kind == "tfree" else t.classic_vocab_size

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.training.save_dir)


def _merge(base: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for section, values in sections.items():
        node = out.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{section} is not a config section")
        node.update(copy.deepcopy(values))
    return out


def draft_arms(cc: CompareConfig) -> list[Arm]:
    """Every arm's config before the comparison's own settings (validated; roles assigned)."""
    arms = []
    for spec in cc.arms:
        data = apply_overrides(_merge(cc.base, spec.sections), list(cc.overrides))
        try:
            cfg = Config.from_dict(data, source=f"{cc.source} (arm {spec.name})")
        except ConfigError as e:
            raise ConfigError(f"arm {spec.name}: {e}") from None
        arms.append(Arm(spec.name, cfg, ""))
    s = cc.settings
    reference = s.reference or next((a.name for a in arms if a.kind == "tfree"), "")
    classic = [a for a in arms if a.kind == "classic"]
    baseline = s.baseline or (max(classic, key=lambda a: a.nominal_vocab).name if classic else "")
    if not reference or not baseline:
        raise ConfigError(f"{cc.source}: compare.arms needs at least one T-Free arm and one classic (BPE) arm")
    for arm in arms:
        arm.role = "reference" if arm.name == reference else "baseline" if arm.name == baseline else ""
    ref = next(a for a in arms if a.role == "reference")
    if ref.kind != "tfree":
        raise ConfigError(f"{cc.source}: compare.reference={reference} must be a T-Free arm")
    if next(a for a in arms if a.role == "baseline").kind != "classic":
        raise ConfigError(f"{cc.source}: compare.baseline={baseline} must be a classic (BPE) arm")
    return sorted(arms, key=lambda a: a.role != "reference")  # the reference first


def equalised_seq_len(ref_seq_len: int, ref_bytes_per_unit: float, arm_bytes_per_unit: float) -> int:
    """The sequence length that holds about the bytes of ``ref_seq_len`` reference units."""
    if ref_bytes_per_unit <= 0 or arm_bytes_per_unit <= 0:
        raise ValueError("bytes per unit must be > 0")
    return max(1, round(ref_seq_len * ref_bytes_per_unit / arm_bytes_per_unit))


def finalise(arm: Arm, runs_dir: str | Path, train: str, valid: str, tokenizer_file: str = "",
             seq_len: Optional[int] = None) -> Arm:
    """``arm`` with its run dir, corpus, BPE file and sequence length set (validated again)."""
    data = arm.cfg.to_dict()
    data["training"]["save_dir"] = str(Path(runs_dir) / arm.name)
    data["training"]["load_dir"] = ""
    data["data"]["prefix_paths"], data["data"]["valid_prefix_paths"] = [train], [valid]
    if arm.kind == "classic":
        data["tokenizer"]["tokenizer_file"] = tokenizer_file
    if seq_len is not None:
        data["data"]["seq_len"] = int(seq_len)
    return Arm(arm.name, Config.from_dict(data, source=f"arm {arm.name}"), arm.role)


def fingerprint(cfg: Config) -> str:
    """A digest of the whole resolved config (an arm is finished only under the same one)."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:20]


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``section.key: old -> new`` for every key that differs between two config dicts."""
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out
