"""The whole comparison on toy arms (conftest ``toy_run``): the report's pieces are written and hold the
measured figures; the verdicts are computed from them; a rerun trains nothing."""

from __future__ import annotations

import copy
import os
import re

import pytest

from compare_helpers import REPO, STEPS


def test_report_files_and_verdict_lines(toy_run):
    r, out = toy_run.report, toy_run.out
    for name in ("report.md", "report.json", "bpb_vs_bytes.png", "fertility_per_corpus.png", "metrics_vs_vocab.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert [a["name"] for a in r["arms"]] == ["tf", "bpe-s", "bpe-l"]
    assert [a["role"] for a in r["arms"]] == ["reference", "", "baseline"]
    states = [v["state"] for v in r["verdicts"]]
    assert set(states) <= {"confirmed", "refuted", "not measurable here"}
    claims = [v["claim"] for v in r["verdicts"]]
    assert claims[0].startswith("87.5% fewer") and claims[1].startswith("competitive quality")
    languages = [c.split(": ")[1] for c in claims if c.startswith("lower fertility")]
    assert languages == ["en", "de", "ru", "vi", "ar", "zh", "code"]
    assert {"no near-duplicate tokens", "lower peak memory at 1B",
            "lower peak memory at this scale (measured)"} <= set(claims)
    for v in r["verdicts"]:  # one table line per verdict, with its figures
        assert f"| {v['claim']} | {v['paper']} | {v['measured']} | **{v['state']}** |" in md
    assert "lower peak memory at 1B" in md and "not measurable here" in md
    assert str(toy_run.argv[3]) in r["corpus"]["description"] and "toklab/probe" in md
    for arm in r["arms"]:
        assert arm["steps"] == STEPS and arm["lm_eval"].keys() == {"hamlet_ppl", "hamlet_cloze"}
        assert 0 < arm["heldout"]["bits_per_byte"] < 20 and arm["heldout"]["next_word"]["words"] > 0
        assert arm["curve"][0][0] == 0 and arm["curve"][-1][0] == arm["trained"]["bytes"]
        assert set(arm["tokenizer"]["probe"]) == {"en", "de", "ru", "vi", "ar", "zh", "code"}
    tf = r["arms"][0]
    assert tf["tokenizer"]["near_duplicate_share"] == 0 and "identical_id_sets" in tf["tokenizer"]["train"]
    assert [row["label"] for row in r["planner"]] == ["T-Free", "BPE 65,536, same positions", "BPE 65,536, same bytes"]


def test_bytes_are_equalised_and_counted(toy_run):
    r = toy_run.report
    ref = r["arms"][0]
    for arm in r["arms"]:
        expected = round(ref["seq_len"] * ref["tokenizer"]["train"]["bytes_per_token"]
                         / arm["tokenizer"]["train"]["bytes_per_token"])
        assert arm["seq_len"] == expected
        positions = STEPS * 8 * arm["seq_len"]  # every position of every sequence, but the padding at an epoch's end
        assert 0.95 * positions <= arm["trained"]["units"] <= positions
        assert abs(arm["trained"]["bytes"] / ref["trained"]["bytes"] - 1) < 0.1


def test_verdicts_are_computed_from_the_figures(toy_run):
    from megatron_tfree.compare.claims import verdicts
    from megatron_tfree.compare.settings import Thresholds

    r = toy_run.report
    assert [v.to_dict() for v in verdicts(r, Thresholds(**r["thresholds"]))] == r["verdicts"]
    worse = copy.deepcopy(r)
    best = min(a["heldout"]["bits_per_byte"] for a in worse["arms"] if a["kind"] == "classic")
    worse["arms"][0]["heldout"]["bits_per_byte"] = best * 1.2
    def quality(tolerance):
        return next(v for v in verdicts(worse, Thresholds(quality_tolerance=tolerance))
                    if v.claim.startswith("competitive quality"))

    assert quality(0.1).state == "refuted" and f"{best * 1.2:.3f}" in quality(0.1).measured
    assert quality(0.25).state == "confirmed"
    worse["arms"][0]["memory"]["peak_rss_bytes"] = 2 * worse["arms"][2]["memory"]["peak_rss_bytes"]
    memory = [v for v in verdicts(worse, Thresholds()) if v.claim.startswith("lower peak memory at this scale")][0]
    assert memory.state == "refuted" and "2.00x" in memory.measured


def test_parameter_figures_are_the_models(toy_run):
    from megatron_tfree.checkpoint import CheckpointReader
    from megatron_tfree.compare.params import trained_params

    for arm in toy_run.report["arms"]:
        model = CheckpointReader(arm["run_dir"]).load_model()
        total = sum(p.numel() for p in model.parameters())
        vocab = model.embedding.weight.numel() + model.output.head.linear.weight.numel()
        assert arm["params"] == trained_params(arm["run_dir"])
        assert (arm["params"]["total"], arm["params"]["embedding_head"]) == (total, vocab)
        assert vocab == 2 * arm["params"]["vocab_size"] * 32
    others = {a["params"]["other"] for a in toy_run.report["arms"]}
    assert len(others) == 1  # the same non-embedding architecture
    nominal = toy_run.report["baseline_at_paper_size"]
    assert nominal["vocab_size"] == 65536 and nominal["embedding_head"] == 2 * 65536 * 32


def test_memory_figures_are_the_measured_ones(toy_run):
    from megatron_tfree.compare.runner import peak_memory, read_state

    for arm in toy_run.report["arms"]:
        state = read_state(arm["run_dir"])
        (segment,) = state["segments"]
        assert segment["from_step"] == 0 and segment["to_step"] == STEPS and segment["peak_rss_scope"] == "training"
        assert arm["memory"] == peak_memory(state)
        assert arm["memory"]["peak_rss_bytes"] == segment["peak_rss_bytes"] >= segment["rss_before_bytes"] > 0


def test_rerun_skips_finished_arms(toy_run, monkeypatch, capsys):
    import megatron_tfree.training.loop as loop
    from megatron_tfree.compare.__main__ import main

    metrics = {a["name"]: (REPO / a["run_dir"] / "metrics.jsonl").read_bytes() for a in toy_run.report["arms"]}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(loop, "train", no_training)
    monkeypatch.chdir(REPO)
    (toy_run.out / "report.md").unlink()
    assert main(toy_run.argv) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"finished earlier \(40/40 steps\), skipped", printed)) == 3
    assert "lm-eval" not in printed  # the evaluation is cached too
    assert (toy_run.out / "report.md").is_file()
    for arm in toy_run.report["arms"]:
        assert (REPO / arm["run_dir"] / "metrics.jsonl").read_bytes() == metrics[arm["name"]]


def test_next_word_teacher_forcing_is_greedy_decoding(toy_run):
    """The one-forward figure equals decoding each word greedily from the text before it."""
    from megatron_tfree.compare.heldout import passages
    from megatron_tfree.compare.next_word import greedy_reproduces, passage_hits
    from megatron_tfree.inference import InferencePipe

    texts = passages(str(toy_run.runs / "corpus" / "valid"), 2, 240)
    hits = 0
    for arm in toy_run.report["arms"]:
        pipe = InferencePipe.from_checkpoint(arm["run_dir"])
        for text in texts:
            h, n = passage_hits(pipe, text)
            words = list(re.finditer(r"\S+", text))
            brute = scored = 0
            for k, m in enumerate(words[:-1]):
                if k == 0:
                    continue
                cut = m.start() - 1 if text[m.start() - 1] == " " else m.start()  # the space is the word's
                brute += greedy_reproduces(pipe, text[:cut], text[cut:m.end()], 8)
                scored += 1
            assert (h, n) == (brute, scored), arm["name"]
            hits += h
    assert hits > 0


@pytest.mark.parametrize("bad", ["compare.nonsense=1", "compare.eval.passages=0"])
def test_bad_settings_are_one_line_errors(toy_run, bad, capsys):
    from megatron_tfree.compare.__main__ import main

    assert main(["--config", str(toy_run.config), bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-tfree-compare: error:") and bad.split("=")[0].split(".", 1)[1] in err
    assert os.path.isdir(REPO)
