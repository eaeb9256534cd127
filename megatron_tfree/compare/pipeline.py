"""The whole comparison, step by step: :func:`run_compare` (what ``python -m megatron_tfree.compare`` runs).

1. load the compare YAML and draft every arm's config (:mod:`.settings`, :mod:`.arms`);
2. the corpus under the runs dir (:mod:`.corpus`); the BPE arms' tokenizers, trained once on its train
   split (:mod:`.bpe`);
3. every tokenizer measured on the train split and the multilingual probe (:mod:`.tokstats`); the other
   arms' ``data.seq_len`` equalised to the reference arm's bytes per sequence (:mod:`.arms`);
4. the arms trained one after another, each in its own process, resumably (:mod:`.runner`);
5. each arm measured (:mod:`.measure`), the planner's 1B rows (:mod:`.planner`), the verdicts
   (:mod:`.claims`), and the report written (:mod:`.report`).
"""

from __future__ import annotations

import datetime
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import arms as arms_mod
from . import bpe, claims, corpus as corpus_mod, heldout, measure, params, planner, report, runner, settings, tokstats

PROBE_SOURCE = ("the tokenizer lab's bundled probe (`megatron_tfree/toklab/probe/*.txt`): the same 25 everyday "
                "sentences, written for this project, in English, German, Russian, Vietnamese, Arabic and Chinese, "
                "and a page of Python, C, SQL and JavaScript")


def _print(message: str) -> None:
    print(message, flush=True)


def run_compare(config: str | Path, overrides: Sequence[str] = (), corpus: Optional[str] = None,
                out: Optional[str | Path] = None, runs_dir: Optional[str | Path] = None,
                isolate: Optional[bool] = None, log: Callable[[str], None] = _print,
                command: Optional[str] = None) -> Path:
    """Run (or resume) the comparison of ``config``; returns the written ``report.md`` (see the module
    docstring). ``out`` (default ``RUNS_DIR/report``) receives only the report files."""
    start = time.perf_counter()
    cc = settings.load(config, list(overrides))
    s = cc.settings
    runs = Path(runs_dir or s.runs_dir)
    out = Path(out) if out else runs / "report"
    isolate = s.isolate if isolate is None else isolate
    drafts = arms_mod.draft_arms(cc)
    ref_draft = drafts[0]

    log(f"corpus: preparing under {runs / 'corpus'}")
    corp = corpus_mod.prepare_corpus(corpus, ref_draft.cfg.to_dict()["data"], runs)
    files: dict[str, str] = {}
    for a in drafts:
        if a.kind != "classic":
            continue
        if a.cfg.tokenizer.tokenizer_file:
            if not Path(a.cfg.tokenizer.tokenizer_file).is_file():
                raise FileNotFoundError(f"arm {a.name}: tokenizer.tokenizer_file {a.cfg.tokenizer.tokenizer_file} "
                                        "does not exist (leave it empty to train one on the train split)")
            files[a.name] = a.cfg.tokenizer.tokenizer_file
            continue
        path = bpe.bpe_path(runs, a.name, s.bpe_preset, a.nominal_vocab)
        if not path.is_file():
            log(f"{a.name}: training a {s.bpe_preset} byte-level BPE of {a.nominal_vocab:,} tokens on the train split")
        files[a.name] = str(bpe.ensure_bpe(path, corp, a.nominal_vocab, s.bpe_preset, s.bpe_min_frequency)[0])

    log("tokenizers: measuring every arm's tokenizer on the train split and the probe (tokenizer lab)")
    specs = {a.name: tokstats.spec_of(a.cfg.tokenizer, files.get(a.name, "")) for a in drafts}
    stats = tokstats.measure(specs, corp.train, s.probe, runs, s.collision_words)
    ref_bpu = tokstats.row(stats, ref_draft.name, stats["train"])["bytes_per_token"]
    final = []
    for a in drafts:
        seq = None
        if s.equalise == "bytes" and a is not ref_draft:
            bpu = tokstats.row(stats, a.name, stats["train"])["bytes_per_token"]
            seq = arms_mod.equalised_seq_len(ref_draft.cfg.data.seq_len, ref_bpu, bpu)
        final.append(arms_mod.finalise(a, runs, corp.train, corp.valid, files.get(a.name, ""), seq))

    trained_now = {}
    for i, a in enumerate(final):
        state = runner.train_arm(a, s.threads, isolate, log=log, position=f"{i + 1}/{len(final)}")
        trained_now[a.name] = not state["skipped"]

    texts = heldout.passages(corp.valid, s.eval.passages, s.eval.passage_bytes)
    ref = final[0]
    entries = []
    for i, a in enumerate(final):
        log(f"[{i + 1}/{len(final)}] {a.name}: measuring")
        words = max(1, round(s.eval.generation_words * a.cfg.data.seq_len / ref.cfg.data.seq_len))
        entries.append({**measure.measure_arm(a, texts, s.eval, words, stats, log=log),
                        "trained_now": trained_now[a.name]})

    base = next(e for e in entries if e["role"] == "baseline")
    base_arm = next(a for a in final if a.role == "baseline")
    nominal = None
    if base["params"]["vocab_size"] != claims.PAPER_BPE_V:
        nominal = params.model_params(base_arm.cfg.model, "classic", claims.PAPER_BPE_V)
    ref_entry = entries[0]
    bytes_ratio = ref_entry["tokenizer"]["train"]["bytes_per_token"] / base["tokenizer"]["train"]["bytes_per_token"]
    sizes = corp.sizes()
    r: dict[str, Any] = {
        "command": command or "python -m megatron_tfree.compare " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
        "generated_at": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "device": _device(entries),
                    "threads": (f"{s.threads} torch thread(s) per training process" if s.threads
                                else "torch's default threads")},
        "corpus": {"description": corp.description, "train_bytes": sizes["train"], "valid_bytes": sizes["valid"]},
        "probe": {"spec": s.probe, "source": PROBE_SOURCE if s.probe == "multilingual" else f"`{s.probe}`"},
        "model": {k: getattr(ref.cfg.model, k) for k in ("hidden_size", "num_layers", "num_attention_heads")},
        "equalise": s.equalise, "equalise_note": _equalise_note(s.equalise, ref, final, stats),
        "arms": entries, "baseline_at_paper_size": nominal,
        "planner": planner.predicted_memory(s.planner, bytes_ratio), "planner_settings": asdict(s.planner),
        "thresholds": asdict(s.thresholds), "prompts": list(s.eval.prompts),
        "passages": {"count": len(texts), "max_bytes": s.eval.passage_bytes,
                     "bytes": sum(len(t.encode("utf-8")) for t in texts)},
        "lm_eval_include": s.eval.lm_eval_include,
    }
    r["verdicts"] = [v.to_dict() for v in claims.verdicts(r, s.thresholds)]
    r["wall_s"] = time.perf_counter() - start
    probe_rows = [row for row in stats["rows"] if row["corpus"] in stats["probe"]]
    path = report.write(r, probe_rows, out)
    log(f"wrote {path} (and report.json, plots) in {out}")
    return path


def _device(entries: list[dict[str, Any]]) -> str:
    devices = {e["memory"].get("device") for e in entries} - {None}
    return "training on " + ("/".join(sorted(devices)) if devices else "an unknown device")


def _equalise_note(mode: str, ref: Any, final: list[Any], stats: dict[str, Any]) -> str:
    if mode != "bytes":
        return "off (compare.equalise: none): every arm uses the same data.seq_len; the bytes trained differ."
    parts = [f"{a.name} {a.cfg.data.seq_len} ({tokstats.row(stats, a.name, stats['train'])['bytes_per_token']:.2f} "
             "bytes/unit)" for a in final]
    return (f"each arm's data.seq_len holds the bytes of {ref.cfg.data.seq_len} units of {ref.name}, from the bytes "
            "per unit each tokenizer gives on the train split: " + ", ".join(parts) +
            "; the bytes actually trained, counted from the training batches, are in the Arms table.")
