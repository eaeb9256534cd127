"""megatron_tfree.sweep (``python -m megatron_tfree.plan --sweep``): candidate parameters are the planner's
and the real model's, every listed row is within the tolerance, FLOPs per word by hand, measured twins,
the documented JSON keys, the plot, the CLI and its errors."""

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_tfree.config import load_config
from megatron_tfree.model import GPTModel
from megatron_tfree.parallel import state
from megatron_tfree.plan import main, param_counts
from megatron_tfree.sweep import (Candidate, SweepError, SweepOptions, check_options, enumerate_candidates, flops_per_position,
                                  measure_twins, parse_int_list, parse_range, parse_vocab, run_sweep, shape_config,
                                  twin_config)

ONE_B = Path(__file__).resolve().parents[1] / "configs" / "1b.yaml"
TOP_KEYS = {"budget", "tolerance", "aspect", "kinds", "units_per_word", "sort", "layout", "within_tolerance", "twin",
            "candidates"}
ROW_KEYS = {"kind", "vocab", "layers", "hidden", "heads", "kv_heads", "head_dim", "mlp_ratio", "ffn", "aspect",
            "params", "embedding_head_params", "other_params", "budget_error", "flops_per_position",
            "flops_per_word", "memory", "twin"}
TWIN_KEYS = {"layers", "hidden", "heads", "kv_heads", "vocab", "seq_len", "batch", "params", "seconds_per_step",
             "step_seconds", "words_per_s", "flops_per_word", "gflops_per_s"}
LAYOUT_KEYS = {"nodes", "gpus_per_node", "tensor", "pipe", "zero_stage", "precision", "micro_batch_size", "seq_len",
               "activation_checkpointing", "gpu_memory_gib"}


def small_base(*overrides):
    return load_config(None, ["data.seq_len=32", "training.micro_batch_size=2", "model.num_attention_heads=2",
                              "model.hidden_size=32", *overrides])


def meta_counts(cfg):
    """Parameters of the real model of ``cfg`` built on the meta device (as checkpoint.names.param_specs)."""
    kind = cfg.tokenizer.kind
    v = cfg.tokenizer.vocab_size if kind == "tfree" else cfg.tokenizer.classic_vocab_size
    with state.single_process(), torch.device("meta"):
        model = GPTModel(cfg.model, kind, v, seed=0)
    return {"total": sum(p.numel() for p in model.parameters()),
            "embedding_head": model.embedding.weight.numel() + model.output.head.linear.weight.numel(),
            "blocks": sum(p.numel() for p in model.blocks.parameters())}


# ------------------------------------------------------------------------------ parameters and FLOPs


@pytest.mark.parametrize("kind,vocab,layers,hidden,heads,kv,ratio,bias", [
    ("tfree", 8192, 20, 2048, 16, 16, 2.66796875, False),   # configs/1b.yaml
    ("classic", 32000, 7, 3072, 24, 8, 4.0, False),          # grouped KV
    ("tfree", 1000, 3, 96, 3, 3, 2.667, True),              # biases, odd inner size int(2.667 * 96) = 256
    ("classic", 257, 5, 64, 4, 2, 3.5, True),
])
def test_candidate_params_equal_planner_and_real_model(kind, vocab, layers, hidden, heads, kv, ratio, bias):
    base = load_config(None, [f"model.bias={str(bias).lower()}", "model.num_attention_heads=4"])
    cfg = shape_config(base, kind, vocab, layers, hidden, heads, ratio, kv)
    row = Candidate(cfg, 1.0).row(1e9)
    real = meta_counts(cfg)
    assert row["params"] == param_counts(cfg)
    assert row["params"]["total"] == real["total"]
    assert row["embedding_head_params"] == real["embedding_head"]
    assert row["other_params"] == real["total"] - real["embedding_head"]
    assert row["params"]["blocks"] == real["blocks"]
    assert (row["kv_heads"], row["ffn"]) == (kv, int(ratio * hidden))


def test_listed_rows_are_the_planners_and_the_models_and_within_tolerance():
    budget, tol = 1e9, 0.1
    o = SweepOptions(params=budget, tolerance=tol, kinds=("tfree", "classic"), vocab={"tfree": [8192], "classic": [32000]},
                     top=0, measure=False, aspect=(0, math.inf))
    result = run_sweep(load_config(ONE_B), o)
    rows = result["candidates"]
    assert len(rows) == result["within_tolerance"] >= 10
    assert {r["kind"] for r in rows} == {"tfree", "classic"}
    for r in rows:
        assert abs(r["params"]["total"] / budget - 1) <= tol and r["budget_error"] == r["params"]["total"] / budget - 1
        assert r["hidden"] % 128 == 0 and r["heads"] == r["hidden"] // 128
    flops = [r["flops_per_word"] for r in rows]
    assert flops == sorted(flops)
    for r in rows[::4]:  # a few against the real model (meta device)
        cfg = shape_config(load_config(ONE_B), r["kind"], r["vocab"], r["layers"], r["hidden"], r["heads"], r["mlp_ratio"])
        assert meta_counts(cfg)["total"] == r["params"]["total"]


def test_without_depths_each_width_takes_its_closest_depth():
    base = small_base()
    o = SweepOptions(params=5e6, tolerance=0.5, vocab={"tfree": [512]}, widths=[64, 128, 256], mlp_ratios=[4.0],
                     head_dim=32, aspect=(0, math.inf))
    within, _ = enumerate_candidates(base, check_options(o, base))
    assert sorted(c.cfg.model.hidden_size for c in within) == [64, 128, 256]  # one depth per width
    for c in within:
        err = abs(c.params["total"] - 5e6)
        for L in (c.cfg.model.num_layers - 1, c.cfg.model.num_layers + 1):
            if L >= 1:
                other = shape_config(base, "tfree", 512, L, c.cfg.model.hidden_size, c.cfg.model.num_attention_heads, 4.0)
                assert abs(param_counts(other)["total"] - 5e6) >= err
    o2 = SweepOptions(params=5e6, tolerance=0.5, vocab={"tfree": [512]}, widths=[256], mlp_ratios=[4.0], head_dim=32,
                      depths=[1, 2, 3, 4, 5, 6], aspect=(0, math.inf))
    within2, _ = enumerate_candidates(base, check_options(o2, base))
    assert len(within2) > 1 and all(abs(c.params["total"] / 5e6 - 1) <= 0.5 for c in within2)


def test_flops_per_word_by_hand():
    # h=16, L=2, 2 heads, SwiGLU inner 2*16=32, v=64, S=8. One block: 2 norms 2h=32, QKV h*3h=768, out h*h=256,
    # gate|up h*2f=1024, down f*h=512: 2592; blocks 5184.
    cfg = shape_config(small_base("data.seq_len=8"), "tfree", 64, 2, 16, 2, 2.0)
    assert param_counts(cfg)["blocks"] == 5184
    per_position = 6 * 5184 + 6 * 16 * 64 + 12 * 2 * 16 * 8
    assert per_position == 40320 == flops_per_position(cfg)
    assert Candidate(cfg, 1.0).row(1e5)["flops_per_word"] == 40320
    classic = shape_config(small_base("data.seq_len=8"), "classic", 64, 2, 16, 2, 2.0)
    assert Candidate(classic, 1.3).row(1e5)["flops_per_word"] == pytest.approx(1.3 * 40320)


# ------------------------------------------------------------------------------------------ twins


def test_twin_config_scales_shape_and_keeps_kind_ratio_and_grouping():
    cfg = shape_config(load_config(ONE_B), "classic", 32000, 20, 2048, 16, 4.0, 4)
    twin = twin_config(cfg, 8)
    m = twin.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_kv_heads) == (2, 256, 16, 4)
    assert twin.tokenizer.kind == "classic" and twin.tokenizer.classic_vocab_size == 4000
    assert twin.data.seq_len == 512 and twin.training.precision == "fp32" and m.mlp_factor == 4.0
    same = twin_config(cfg, 1)
    assert param_counts(same) == param_counts(cfg)


def test_measured_twins_are_positive_and_threads_are_restored():
    threads = torch.get_num_threads()
    cfgs = [shape_config(small_base("data.seq_len=16"), kind, 128, 2, 32, 2, 2.0) for kind in ("tfree", "classic")]
    out = measure_twins([(cfgs[0], 1.0), (cfgs[1], 1.3)], batch=2, steps=2, warmup=1)
    assert torch.get_num_threads() == threads
    for r, cfg in zip(out, cfgs):
        assert set(r) == TWIN_KEYS and len(r["step_seconds"]) == 2
        assert r["words_per_s"] > 0 and r["seconds_per_step"] > 0 and r["params"] == param_counts(cfg)["total"]
    assert out[1]["words_per_s"] == pytest.approx(2 * 16 / 1.3 / out[1]["seconds_per_step"])


def test_sweep_with_twins_json_keys_and_plot(tmp_path, capsys):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = ["--sweep", "--params", "3e5", "--vocab", "256", "--head-dim", "16", "--widths", "32,48,64,96",
            "--mlp-ratios", "4", "--aspect", "any", "--top", "2", "--twin-steps", "1", "--twin-warmup", "0",
            "--json", str(out), "--plot", str(png), "data.seq_len=32"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| # | kind |" in text and "twin words/s" in text
    data = json.loads(out.read_text())
    assert set(data) == TOP_KEYS and set(data["layout"]) == LAYOUT_KEYS
    assert set(data["twin"]) == {"scale", "batch", "steps", "warmup", "threads"}
    assert len(data["candidates"]) == 2 and data["within_tolerance"] >= 2
    for r in data["candidates"]:
        assert set(r) == ROW_KEYS and set(r["twin"]) == TWIN_KEYS and r["twin"]["words_per_s"] > 0
        assert set(r["memory"]) == {"bytes", "gib", "fits", "error"} and r["memory"]["fits"]
        assert abs(r["budget_error"]) <= 0.15
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# -------------------------------------------------------------------------------------------- CLI


def test_cli_sweep_prints_the_table(capsys):
    assert main(["--sweep", "--params", "2e6", "--no-measure"]) == 0
    text = capsys.readouterr().out
    assert "budget 2M parameters" in text and "| # | kind | vocab | layers | hidden |" in text
    assert "twins:" not in text and "twin words/s" not in text


def test_cli_json_to_stdout(capsys):
    assert main(["--sweep", "--params", "2e6", "--no-measure", "--json", "-", "--kind", "both", "--vocab",
                 "tfree:4096,classic:1000", "--aspect", "any"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["twin"] is None and data["aspect"] == [0, None] and set(data["kinds"]) == {"tfree", "classic"}
    assert {(r["kind"], r["vocab"]) for r in data["candidates"]} <= {("tfree", 4096), ("classic", 1000)}


def test_cli_impossible_budget_is_one_clear_line(capsys):
    assert main(["--sweep", "--params", "1000", "--no-measure"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("megatron-tfree-plan: no configuration within 15%")
    assert "1,000 parameters" in err and "the closest:" in err and "x the budget" in err


@pytest.mark.parametrize("args,words", [
    (["--tolerance", "1.5"], "--tolerance"),
    (["--widths", "100"], "multiples of the head dim"),
    (["--depths", "0-3"], "--depths"),
    (["--vocab", "xl:5"], "--vocab"),
    (["--aspect", "9-3"], "--aspect"),
    (["--head-dim", "7"], "--head-dim"),
])
def test_cli_bad_sweep_options(capsys, args, words):
    assert main(["--sweep", "--params", "2e6", "--no-measure", *args]) == 2
    assert words in capsys.readouterr().err


def test_sweep_options_need_sweep_and_sweep_needs_params(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--params", "1e9"])
    assert e.value.code == 2 and "--params needs --sweep" in capsys.readouterr().err
    assert main(["--sweep"]) == 2
    assert "--params" in capsys.readouterr().err


def test_parsers():
    assert parse_int_list("8,12,16-18,8", "--depths") == [8, 12, 16, 17, 18]
    assert parse_vocab("8192,classic:32000,50000") == {"tfree": [8192], "classic": [8192, 32000, 50000]}
    assert parse_vocab("bpe:1000,tfree:64") == {"classic": [1000], "tfree": [64]}
    assert parse_range("16-1024", "--aspect") == (16, 1024) and parse_range("32-", "--aspect") == (32, math.inf)
    with pytest.raises(SweepError):
        parse_int_list("a", "--depths")
