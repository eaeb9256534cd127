"""The T-Free paper's claims (Deiseroth et al. 2024) and the verdict the measured figures give on each.

Every verdict is computed here from the numbers in the comparison's report (never written by hand):
``state`` is ``confirmed``, ``refuted`` or ``not measurable here``, with the figures behind it and the
rule (:class:`~.settings.Thresholds`) it applied:

* **parameters**: 87.5% fewer embedding + head parameters at v=8k than with a 64k vocabulary: the
  measured reduction of the reference arm against the baseline's model at the paper's 64k rows (built on
  the meta device when the corpus gave the trained BPE fewer tokens; its own figure is shown too) within
  ``params_tolerance`` of 87.5%.
* **quality**: "competitive": the reference arm's held-out bits per byte at most ``1 + quality_tolerance``
  times the best BPE arm's.
* **fertility** (one verdict per probe language): the reference arm's tokens per word below
  ``1 - fertility_margin`` times the baseline's (the paper's Table 1 figures shown where it has them).
* **near-duplicates**: the T-Free vocabulary has none (share 0), the BPE arms' shares shown.
* **memory at 1B** (38 GB vs 68 GB): not measurable on this machine's scale; the planner's prediction at
  both vocabularies is given. Measured on a GPU it would still be a small model, so this stays open.
* **memory at this scale**: the reference arm's measured peak (CUDA allocation on a GPU, else process
  RSS) below ``1 - memory_margin`` times the baseline's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .settings import Thresholds

CONFIRMED, REFUTED, NOT_MEASURABLE = "confirmed", "refuted", "not measurable here"
PAPER_REDUCTION = 0.875  # 1 - 8k / 64k
PAPER_TFREE_V, PAPER_BPE_V = 8192, 65536
# Table 1 of the paper: tokens per word, T-Free vs a 64k Unigram
PAPER_FERTILITY = {"en": (1.163, 1.280), "de": (1.182, 2.004), "ru": (1.338, 11.431), "vi": (1.400, 5.060),
                   "ar": (1.086, 9.455)}
PAPER_MEMORY_GB = (38, 68)  # peak memory of the 1B models: T-Free vs the classic vocabulary


@dataclass
class Verdict:
    claim: str
    paper: str
    state: str
    measured: str  # the figures, in words
    rule: str
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def params_verdict(ref_eh: int, base_eh: int, base_vocab: int, nominal_eh: Optional[int],
                   tol: float) -> Verdict:
    """``ref_eh``: the reference arm's embedding + head parameters; ``base_eh`` / ``base_vocab``: the
    trained baseline's and its real vocabulary; ``nominal_eh``: the baseline model at 64k rows (None when
    its real vocabulary is 64k already)."""
    real = 1 - ref_eh / base_eh
    reduction = real if nominal_eh is None else 1 - ref_eh / nominal_eh
    ok = abs(reduction - PAPER_REDUCTION) <= tol
    text = (f"{_pct(reduction)} fewer ({ref_eh:,} vs {nominal_eh or base_eh:,} embedding+head parameters at "
            f"{PAPER_BPE_V:,} rows)")
    if nominal_eh is not None:
        text += (f"; the trained BPE arm has {base_vocab:,} rows (the corpus gives no more merges): "
                 f"{_pct(real)} fewer than it ({base_eh:,})")
    return Verdict("87.5% fewer embedding+head parameters (v=8k vs a 64k vocabulary)",
                   "87.5%", CONFIRMED if ok else REFUTED, text,
                   f"confirmed if within {100 * tol:.1f} percentage points of 87.5%",
                   {"reduction": reduction, "reduction_trained_arm": real, "reference": ref_eh,
                    "baseline_trained": base_eh, "baseline_vocab": base_vocab, "baseline_nominal": nominal_eh})


def quality_verdict(ref_bpb: float, bpe_bpb: dict[str, float], tol: float,
                    ref_acc: Optional[float] = None, bpe_acc: Optional[dict[str, Optional[float]]] = None,
                    untrained: Optional[dict[str, Optional[float]]] = None) -> Verdict:
    """``bpe_bpb``: ``{arm: held-out bits per byte}`` of the BPE arms; ``untrained``: ``{"reference": x,
    arm: y}``, the trainer's held-out figure before training (shown, not judged)."""
    best = min(bpe_bpb, key=bpe_bpb.get)
    ratio = ref_bpb / bpe_bpb[best]
    ok = ratio <= 1 + tol
    text = (f"T-Free {ref_bpb:.3f} bits/byte vs the best BPE arm ({best}) {bpe_bpb[best]:.3f}: "
            f"{'+' if ratio >= 1 else ''}{_pct(ratio - 1)}")
    if ref_acc is not None and bpe_acc and bpe_acc.get(best) is not None:
        text += f"; next-word accuracy {_pct(ref_acc)} vs {_pct(bpe_acc[best])}"
    if untrained and untrained.get("reference") is not None and untrained.get(best) is not None:
        text += f" (untrained, the trainer's held-out figure: {untrained['reference']:.3f} vs {untrained[best]:.3f})"
    return Verdict("competitive quality at v=8k (held-out bits per byte)", "competitive with the 64k baseline",
                   CONFIRMED if ok else REFUTED, text,
                   f"confirmed if T-Free <= {1 + tol:.2f} x the best BPE arm's bits per byte",
                   {"reference": ref_bpb, "best_bpe": best, "best_bpe_bpb": bpe_bpb[best], "ratio": ratio})


def fertility_verdicts(ref: dict[str, float], base: dict[str, float], base_name: str, margin: float) -> list[Verdict]:
    """One verdict per language present in both (``{language: tokens per word}``)."""
    out = []
    for lang in ref:
        if lang not in base:
            continue
        t, b = ref[lang], base[lang]
        ok = t < (1 - margin) * b
        paper = PAPER_FERTILITY.get(lang)
        out.append(Verdict(f"lower fertility than a 64k vocabulary: {lang}",
                           f"{paper[0]:.3f} vs {paper[1]:.3f}" if paper else "(not in the paper's Table 1)",
                           CONFIRMED if ok else REFUTED, f"T-Free {t:.3f} vs {base_name} {b:.3f} tokens per word",
                           f"confirmed if T-Free < {1 - margin:.2f} x {base_name}",
                           {"language": lang, "reference": t, "baseline": b}))
    return out


def near_duplicate_verdict(ref_share: float, bpe_shares: dict[str, float]) -> Verdict:
    shares = ", ".join(f"{name} {_pct(s)}" for name, s in bpe_shares.items())
    return Verdict("no near-duplicate tokens", "none for T-Free; classic vocabularies have them",
                   CONFIRMED if ref_share == 0 else REFUTED,
                   f"T-Free {_pct(ref_share)} (words are not vocabulary entries); BPE arms: {shares}",
                   "confirmed if T-Free's share is 0",
                   {"reference": ref_share, "bpe": dict(bpe_shares)})


def memory_1b_verdict(planner: list[dict[str, Any]], measured_at_scale: bool = False) -> Verdict:
    """The 1B claim: only the planner's prediction is available at this scale."""
    t = planner[0]
    parts = [f"{r['label']} {r['gib_per_gpu']:.1f} GiB ({r['gib_per_gpu'] / t['gib_per_gpu']:.2f}x T-Free)"
             for r in planner[1:]]
    text = (f"no 1B model is trained here; the planner predicts T-Free {t['gib_per_gpu']:.1f} GiB per GPU vs "
            + ", ".join(parts) + f" (paper: {PAPER_MEMORY_GB[0]} vs {PAPER_MEMORY_GB[1]} GB)")
    return Verdict("lower peak memory at 1B", f"{PAPER_MEMORY_GB[0]} GB vs {PAPER_MEMORY_GB[1]} GB", NOT_MEASURABLE,
                   text, "needs a 1B training run on GPUs", {"planner": planner})


def memory_scale_verdict(ref: Optional[int], base: Optional[int], what: str, margin: float,
                         base_name: str) -> Verdict:
    """Measured peaks (bytes) of the reference and baseline arms; ``what``: "CUDA" or "RSS"."""
    claim = "lower peak memory at this scale (measured)"
    if not ref or not base:
        return Verdict(claim, "lower", NOT_MEASURABLE, "no memory measurement for both arms", "", {})
    ok = ref < (1 - margin) * base
    return Verdict(claim, "lower", CONFIRMED if ok else REFUTED,
                   f"peak {what}: T-Free {ref / 2**20:,.0f} MiB vs {base_name} {base / 2**20:,.0f} MiB "
                   f"({ref / base:.2f}x)", f"confirmed if T-Free < {1 - margin:.2f} x {base_name}",
                   {"reference": ref, "baseline": base, "what": what})


def verdicts(report: dict[str, Any], thresholds: Thresholds) -> list[Verdict]:
    """Every verdict from a comparison report (:mod:`.report`'s ``report.json`` structure)."""
    ref = next(a for a in report["arms"] if a["role"] == "reference")
    base = next(a for a in report["arms"] if a["role"] == "baseline")
    bpe = [a for a in report["arms"] if a["kind"] == "classic"]
    out = []
    nominal = report.get("baseline_at_paper_size")
    out.append(params_verdict(ref["params"]["embedding_head"], base["params"]["embedding_head"],
                              base["params"]["vocab_size"], nominal["embedding_head"] if nominal else None,
                              thresholds.params_tolerance))
    scored = [a for a in bpe if a.get("heldout")]
    if ref.get("heldout") and scored:
        first = lambda arm: arm["curve"][0][1] if arm.get("curve") and arm["curve"][0][0] == 0 else None  # noqa: E731
        out.append(quality_verdict(ref["heldout"]["bits_per_byte"],
                                   {a["name"]: a["heldout"]["bits_per_byte"] for a in scored},
                                   thresholds.quality_tolerance, ref["heldout"]["next_word"]["accuracy"],
                                   {a["name"]: a["heldout"]["next_word"]["accuracy"] for a in scored},
                                   {"reference": first(ref), **{a["name"]: first(a) for a in scored}}))
    fert = lambda arm: {lang: r["fertility"] for lang, r in arm["tokenizer"]["probe"].items()}  # noqa: E731
    out += fertility_verdicts(fert(ref), fert(base), base["name"], thresholds.fertility_margin)
    out.append(near_duplicate_verdict(ref["tokenizer"]["near_duplicate_share"],
                                      {a["name"]: a["tokenizer"]["near_duplicate_share"] for a in bpe}))
    out.append(memory_1b_verdict(report["planner"]))
    rm, bm = ref["memory"], base["memory"]
    if rm.get("cuda_peak_bytes") and bm.get("cuda_peak_bytes"):
        out.append(memory_scale_verdict(rm["cuda_peak_bytes"], bm["cuda_peak_bytes"], "CUDA allocation",
                                        thresholds.memory_margin, base["name"]))
    else:
        out.append(memory_scale_verdict(rm.get("peak_rss_bytes"), bm.get("peak_rss_bytes"),
                                        "RSS of the training process", thresholds.memory_margin, base["name"]))
    return out
