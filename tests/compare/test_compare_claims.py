"""Each verdict is computed from measured figures and flips where its rule says (synthetic figures)."""

from __future__ import annotations

import pytest

from megatron_tfree.compare import claims


def test_parameter_reduction_at_the_tolerance():
    v = claims.params_verdict(2 * 8192 * 64, 2 * 49494 * 64, 49494, 2 * 65536 * 64, tol=0.01)
    assert v.state == "confirmed" and v.figures["reduction"] == pytest.approx(0.875)
    assert "87.5% fewer" in v.measured and "49,494 rows" in v.measured and "83.4%" in v.measured
    # no model at the paper's size: the trained arm's real 49,494 rows decide, 8.4 points under 87.5%
    assert claims.params_verdict(2 * 8192 * 64, 2 * 49494 * 64, 49494, None, tol=0.01).state == "refuted"
    assert claims.params_verdict(2 * 8192 * 64, 2 * 49494 * 64, 49494, None, tol=0.09).state == "confirmed"


def test_quality_flips_at_the_threshold():
    bpe = {"bpe-8k": 2.0, "bpe-64k": 2.2}
    assert claims.quality_verdict(2.19, bpe, tol=0.10).state == "confirmed"  # 9.5% above the best (bpe-8k)
    v = claims.quality_verdict(2.21, bpe, tol=0.10)
    assert v.state == "refuted" and "bpe-8k" in v.measured and "+10.5%" in v.measured
    v = claims.quality_verdict(1.5, bpe, tol=0.0, ref_acc=0.2, bpe_acc={"bpe-8k": 0.1},
                               untrained={"reference": 3.0, "bpe-8k": 4.0})
    assert v.state == "confirmed" and "20.0% vs 10.0%" in v.measured and "3.000 vs 4.000" in v.measured


def test_fertility_one_verdict_per_language():
    out = claims.fertility_verdicts({"en": 1.2, "ru": 1.3, "code": 3.5}, {"en": 1.25, "ru": 11.0, "code": 3.3},
                                    "bpe-64k", margin=0.0)
    assert [(v.figures["language"], v.state) for v in out] == [("en", "confirmed"), ("ru", "confirmed"),
                                                                ("code", "refuted")]
    assert out[0].paper == "1.163 vs 1.280" and "not in the paper" in out[2].paper
    assert claims.fertility_verdicts({"en": 1.2}, {"en": 1.25}, "b", margin=0.05)[0].state == "refuted"


def test_near_duplicates_and_memory():
    assert claims.near_duplicate_verdict(0.0, {"bpe": 0.3}).state == "confirmed"
    assert claims.near_duplicate_verdict(0.01, {"bpe": 0.3}).state == "refuted"
    planner = [{"label": "T-Free", "gib_per_gpu": 20.0}, {"label": "BPE", "gib_per_gpu": 30.0}]
    v = claims.memory_1b_verdict(planner)
    assert v.state == "not measurable here" and "20.0 GiB" in v.measured and "1.50x" in v.measured
    assert claims.memory_scale_verdict(600 << 20, 1200 << 20, "RSS", 0.0, "bpe-64k").state == "confirmed"
    v = claims.memory_scale_verdict(1300 << 20, 1200 << 20, "RSS", 0.0, "bpe-64k")
    assert v.state == "refuted" and "1,300 MiB" in v.measured and "1.08x" in v.measured
    assert claims.memory_scale_verdict(None, 1200, "RSS", 0.0, "b").state == "not measurable here"
