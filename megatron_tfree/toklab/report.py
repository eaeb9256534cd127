"""``toklab report``: several tokenizers on several corpora -> ``report.json``, ``report.md`` and plots.

    rows = report(["bpe-8k.json", "tfree:v=8192,m=10"], ["default", "multilingual"], out="report/")

``report.json`` is a list of objects, one per (tokenizer, corpus), with ``tokenizer``, ``corpus``,
``kind``, ``preset``, ``vocab_size`` and the metrics of :mod:`.metrics` (``fertility``,
``bytes_per_token``, ``chars_per_token``, ``nsl``, ``renyi_efficiency``, ``shannon_efficiency``,
``near_duplicate_share``, ``unused_share``; T-Free also ``ids_per_word``, ``identical_id_sets``,
``overlapping_pairs``). NSL is against ``base`` (default: the first tokenizer). Plots:
``metrics_vs_vocab.png`` (fertility, bytes per token, Renyi efficiency and NSL against the vocabulary
size on the first corpus, one line per preset) and ``fertility_per_corpus.png`` (every corpus).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm import tqdm

from .metrics import summary, tfree_collisions
from .sources import parse_corpus
from .specs import load_spec, pretoken_counts

COLUMNS = [("fertility", "fertility", ".3f"), ("bytes_per_token", "bytes/token", ".2f"),
           ("chars_per_token", "chars/token", ".2f"), ("nsl", "NSL", ".3f"), ("renyi_efficiency", "Rényi eff.", ".3f"),
           ("shannon_efficiency", "Shannon eff.", ".3f"), ("near_duplicate_share", "near-dup", ".1%"),
           ("unused_share", "unused", ".1%")]


def report(tokenizers: Sequence[str], corpora: Sequence[str], out: Optional[str | Path] = None,
           base: Optional[str] = None, renyi_order: float = 2.5, collision_words: int = 2000,
           collision_threshold: float = 0.9, progress: bool = True) -> list[dict[str, Any]]:
    """Measure every tokenizer SPEC on every corpus SPEC; write the report files to ``out`` if given."""
    specs = [load_spec(s) for s in tokenizers]
    base_index = list(tokenizers).index(base) if base in tokenizers else 0 if base is None else None
    base_spec = specs[base_index] if base_index is not None else load_spec(base)
    sources = [s for c in corpora for s in parse_corpus(c)]
    near_dup = {spec.name: spec.near_duplicate_share() for spec in specs}
    rows: list[dict[str, Any]] = []
    steps = tqdm(total=len(sources) * (len(specs) + (base_index is None)), desc="measuring", disable=not progress)
    for source in sources:
        pretokens: dict[tuple, Any] = {}  # (regex, specials) -> pre-token counts: cut once per source

        def measure(spec: Any) -> Any:
            if getattr(spec, "pattern", None) is None:
                return spec.tally(source.documents())
            key = (spec.pattern, tuple(spec.special_texts))
            if key not in pretokens:
                pretokens[key] = pretoken_counts(source.documents(), *key)
            return spec.tally_pretokens(*pretokens[key])

        tallies = {}
        if base_index is None:
            tallies[None] = measure(base_spec)
            steps.update(1)
        for i, spec in enumerate(specs):
            steps.set_postfix_str(f"{spec.name} on {source.name}")
            tallies[i] = measure(spec)
            steps.update(1)
        base_units = tallies[base_index].units
        for i, spec in enumerate(specs):
            tally = tallies[i]
            row = {"tokenizer": spec.name, "corpus": source.name, "kind": spec.kind, "preset": spec.preset,
                   "vocab_size": spec.vocab_size, **summary(tally, spec.vocab_size, base_units, renyi_order),
                   "near_duplicate_share": near_dup[spec.name]}
            if spec.kind == "tfree":
                row["ids_per_word"] = tally.word_ids / max(tally.units, 1)
                row.update(tfree_collisions(spec.tokenizer, tally.word_freq, collision_words, collision_threshold))
            rows.append(row)
    steps.close()
    if out is not None:
        write(rows, Path(out), base_spec.name, renyi_order)
    return rows


def _fmt(value: Any, fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown(rows: list[dict[str, Any]], base_name: str, renyi_order: float) -> str:
    lines = [f"NSL against `{base_name}`; Rényi efficiency of order {renyi_order:g}; T-Free ids are its trigram ids "
             f"(efficiencies over the v ids, near-duplicates 0 by construction).", "",
             "| tokenizer | corpus | V | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['tokenizer']} | {r['corpus']} | {r['vocab_size']:,} | " +
                     " | ".join(_fmt(r.get(k), f) for k, _, f in COLUMNS) + " |")
    tfree = [r for r in rows if r["kind"] == "tfree"]
    if tfree:
        lines += ["", "| T-Free tokenizer | corpus | ids per word | words with an identical id set | word pairs with "
                  "Jaccard >= threshold | words checked |", "|---|---|---:|---:|---:|---:|"]
        for r in tfree:
            lines.append(f"| {r['tokenizer']} | {r['corpus']} | {r['ids_per_word']:.1f} | {r['identical_id_sets']:.2%} | "
                         f"{r['overlapping_pairs']:.4%} | {r['words_checked']:,} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    metrics = [("fertility", "fertility (tokens / word)"), ("bytes_per_token", "bytes per token"),
               ("renyi_efficiency", "Rényi efficiency"), ("nsl", "NSL vs base")]
    corpora = list(dict.fromkeys(r["corpus"] for r in rows))
    first = [r for r in rows if r["corpus"] == corpora[0]]  # the first corpus: averaging languages would mislead
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, metrics):
        for preset in dict.fromkeys(r["preset"] for r in first):
            pts = sorted((r["vocab_size"], r[key]) for r in first if r["preset"] == preset
                         and not (isinstance(r.get(key), float) and math.isnan(r[key])))
            style = "s" if preset == "tfree" else "o-"
            ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=preset, markersize=7)
        ax.set_xscale("log")
        ax.set_xlabel("vocabulary size")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"on {corpora[0]}")
    fig.tight_layout()
    paths.append(out / "metrics_vs_vocab.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    names = list(dict.fromkeys(r["tokenizer"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, len(corpora) * 1.4), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = {r["corpus"]: r["fertility"] for r in rows if r["tokenizer"] == name}
        ax.bar([c + i * width for c in range(len(corpora))], [values.get(c, 0) for c in corpora], width, label=name)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(corpora))], corpora)
    ax.set_yscale("log")  # scripts without spaces between words are far above the rest
    ax.set_ylabel("fertility (units per whitespace word)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(out / "fertility_per_corpus.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write(rows: list[dict[str, Any]], out: Path, base_name: str, renyi_order: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rows, indent=1) + "\n")
    plots = plot(rows, out)
    md = "# Tokenizer report\n\n" + markdown(rows, base_name, renyi_order) + "\n" + "".join(
        f"![{p.stem}]({p.name})\n" for p in plots)
    (out / "report.md").write_text(md)
