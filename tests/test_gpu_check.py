"""scripts/gpu_check.sh and benchmarks/train_mfu.py on a CPU machine: FLOP accounting, the peak table,
the --dry-run training path, the no-CUDA exits and the JSON assembly (the GPU runs themselves need a GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
TRAIN_MFU = ROOT / "benchmarks" / "train_mfu.py"
no_gpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
# a tiny model for the CPU dry runs (seconds on 2 cores)
TINY = ["--config", "configs/tiny.yaml", "--seq-len", "16", "--classic-vocab", "512", "--warmup", "1",
        "model.hidden_size=32", "model.num_layers=1", "model.num_attention_heads=2", "tokenizer.vocab_size=512"]


def _train_mfu():
    spec = importlib.util.spec_from_file_location("train_mfu_under_test", TRAIN_MFU)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "TOKENIZERS_PARALLELISM": "false", **extra}
    env.pop("MEGATRON_TFREE_CUDA_JIT", None)
    return env


# ---------------------------------------------------------------------------------------- FLOPs, peak
def test_train_mfu_flop_accounting_by_hand():
    from megatron_tfree.config import Config
    from megatron_tfree.model import GPTModel

    tm = _train_mfu()
    h, L, S, v, V, ffn = 64, 2, 16, 512, 1000, 170  # ffn = int(2.66796875 * 64)
    base = Config.from_dict({"model": {"hidden_size": h, "num_layers": L, "num_attention_heads": 4},
                             "tokenizer": {"vocab_size": v, "vocab_population": 10}})
    block = 2 * h + h * 3 * h + h * h + h * 2 * ffn + ffn * h  # norms, QKV, out, gate|up, down = 49152
    assert block == 49152
    cfg = tm.kind_config(base, "tfree", V, S, 2, False, "bf16")
    model = GPTModel(cfg.model, "tfree", v, seed=0)
    assert sum(p.numel() for blk in model.blocks for p in blk.parameters()) == L * block  # the real model agrees
    f = tm.flop_counts(cfg, ids_per_position=60)
    assert f["blocks"] == 6 * 2 * 49152 == 589824
    assert f["attention"] == 12 * 2 * 64 * 16 == 24576
    assert f["head"] == 6 * 64 * 512 == 196608
    assert f["embedding"] == 2 * 60 * 64 == 7680
    assert f["model"] == 589824 + 24576 + 196608 + 7680 == 818688
    assert f["recompute"] == 0 and f["hardware"] == f["model"]
    ck = tm.flop_counts(tm.kind_config(base, "tfree", V, S, 2, True, "bf16"), ids_per_position=60, checkpointing=True)
    assert ck["model"] == 818688  # MFU counts model FLOPs ...
    assert ck["recompute"] == 2 * 2 * 49152 + 4 * 2 * 64 * 16 == 204800  # ... the recompute only in hardware
    assert ck["hardware"] == 818688 + 204800
    classic = tm.flop_counts(tm.kind_config(base, "classic", V, S, 2, False, "bf16"), ids_per_position=1)
    assert classic["head"] == 6 * 64 * 1000 and classic["embedding"] == 2 * 64
    assert classic["model"] == 589824 + 24576 + 384000 + 128


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA GeForce RTX 4090", 165.0),
    ("NVIDIA H100 NVL", None), ("NVIDIA L40", None), ("Tesla V100-SXM2-16GB", None), ("cpu", None),
])
def test_train_mfu_peak_table_lookup(name, peak):
    value, label = _train_mfu().peak_tflops(name)
    assert value == peak
    assert isinstance(label, str) and label


# ---------------------------------------------------------------------------------------- train_mfu.py
def test_train_mfu_auto_micro_batch_starts_above_the_planner_pick():
    from megatron_tfree.config import load_config

    tm = _train_mfu()
    args = tm.build_parser().parse_args([])
    cfg = load_config(ROOT / "configs" / "1b.yaml")
    cuda = torch.device("cuda")  # only its type is read
    # the planner puts 1b at micro batch 8 near 92 GiB (sdpa, no checkpointing): <= 90% of an H200's 139.8 GiB,
    # 16 is above: start one size higher (the planner may be conservative), then halve on OOM
    assert tm.candidate_sizes(args, cfg, "tfree", False, cuda, 139.8, False, "bf16") == [16, 8, 4, 2, 1]
    assert tm.candidate_sizes(args, cfg, "tfree", False, cuda, 10.0, False, "bf16") == [1]  # nothing fits: try 1
    assert tm.candidate_sizes(args, cfg, "tfree", True, cuda, 139.8, False, "bf16")[0] == 64  # capped at the max
    args.micro_batch = "3"
    assert tm.candidate_sizes(args, cfg, "tfree", False, cuda, 139.8, False, "bf16") == [3]


def test_train_mfu_out_of_memory_search_and_checkpointing_fallback(monkeypatch):
    """Sizes that raise OutOfMemoryError are dropped, the next smaller one tried; checkpointing=auto turns it
    on when even the smallest size does not fit without it (faked OOMs, so this runs on the CPU)."""
    tm = _train_mfu()
    args = tm.build_parser().parse_args(["--steps", "2", "--warmup", "1", "--seq-len", "8", *TINY[4:]])
    args.trigrams_per_word = 6.0
    from megatron_tfree.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", args.overrides)
    real_step = tm.MixedPrecisionTrainer.step

    def step(self, batch):
        if not self.model.cfg.activation_checkpointing or batch.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (faked)")
        return real_step(self, batch)

    monkeypatch.setattr(tm.MixedPrecisionTrainer, "step", step)
    monkeypatch.setattr(tm, "candidate_sizes", lambda *a: [8, 4, 2])
    row = tm.measure_kind(args, cfg, "tfree", torch.device("cpu"), "bf16", float("inf"), [])
    assert [(a["micro_batch"], a["checkpointing"], a["result"]) for a in row["attempts"]] == [
        (8, False, "oom"), (4, False, "oom"), (2, False, "oom"), (8, True, "oom"), (4, True, "oom"), (2, True, "ok")]
    assert row["micro_batch"] == 2 and row["checkpointing"] is True and row["steps_timed"] == 2
    f = row["flops_per_position"]
    assert f["recompute"] > 0 and f["hardware"] == f["model"] + f["recompute"]
    assert row["hardware_tflops"] > row["model_tflops"] > 0


def test_train_mfu_dry_run_writes_the_documented_json(tmp_path):
    out = tmp_path / "mfu.json"
    res = subprocess.run([sys.executable, str(TRAIN_MFU), "--dry-run", "--steps", "2", "--peak-tflops", "1.0",
                          "--json", str(out), *TINY], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    for key in ("device", "dry_run", "precision", "peak_tflops", "peak_source", "peak_note", "flops_formula",
                "assumptions", "kinds", "tfree_vs_classic_words_per_s", "mfu", "notes"):
        assert key in data, key
    assert data["dry_run"] is True and data["peak_tflops"] == 1.0 and "no sparsity" in data["peak_note"]
    assert set(data["kinds"]) == {"tfree", "classic"}
    for kind, row in data["kinds"].items():
        assert row["kind"] == kind and row["steps_timed"] == 2 and row["micro_batch"] == 2
        assert row["checkpointing"] is False and row["seq_len"] == 16
        for key in ("step_time_s", "step_time_mean_s", "positions_per_s", "tokens_per_s", "words_per_s",
                    "model_tflops", "hardware_tflops", "mfu", "planner_memory_bytes", "ids_per_position"):
            assert isinstance(row[key], (int, float)) and row[key] > 0, (kind, key, row[key])
        assert row["mfu"] == pytest.approx(row["model_tflops"] / 1.0)
        assert row["tokens_per_s"] == row["positions_per_s"]
        assert row["peak_memory_bytes"] is None  # no torch.cuda.max_memory_allocated on the CPU
        assert row["params"]["measured"] == row["params"]["total"] > 0
        assert row["flops_per_position"]["model"] > 0
        assert row["attempts"] == [{"micro_batch": 2, "checkpointing": False, "result": "ok",
                                    "planner_gib": row["attempts"][0]["planner_gib"]}]
    tfree, classic = data["kinds"]["tfree"], data["kinds"]["classic"]
    assert 40 < tfree["ids_per_position"] < 80  # ~6 trigrams x m = 10 ids per word
    assert classic["ids_per_position"] == 1.0
    assert classic["words_per_s"] == pytest.approx(classic["positions_per_s"] / 1.3)
    assert data["mfu"] == tfree["mfu"]
    assert data["tfree_vs_classic_words_per_s"] == pytest.approx(tfree["words_per_s"] / classic["words_per_s"])


@no_gpu_only
def test_train_mfu_without_cuda_exits_2_with_one_line():
    res = subprocess.run([sys.executable, str(TRAIN_MFU), "--config", "configs/tiny.yaml"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA device:"), res.stderr
    assert res.stdout == ""


# ---------------------------------------------------------------------------------------- gpu_check.sh
def test_gpu_check_script_syntax():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@no_gpu_only
def test_gpu_check_without_cuda_exits_2(tmp_path):
    out = tmp_path / "x.json"
    res = subprocess.run(["bash", str(SCRIPT), "--json", str(out)], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA device:"), res.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is False and report["exit_code"] == 2 and report["device"] is None
    assert report["error"].startswith("no CUDA device:")


def test_gpu_check_rejects_unknown_arguments(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), "--no-such-flag"], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 64 and "unknown argument" in res.stderr


def _assembler() -> str:
    text = SCRIPT.read_text()
    start = text.index("<<'ASSEMBLE_JSON'\n") + len("<<'ASSEMBLE_JSON'\n")
    return text[start:text.index("\nASSEMBLE_JSON\n", start)]


def test_gpu_check_assembles_part_results(tmp_path):
    logs = tmp_path / "run_logs"
    logs.mkdir()
    (logs / "device.json").write_text(json.dumps({"name": "NVIDIA H200", "capability": "9.0"}))
    (logs / "build.status").write_text("ok 0 95 168\n")
    (logs / "build.log").write_text("CUDA extension: JIT build\n")
    (logs / "build.json").write_text(json.dumps({"how": "JIT build", "smoke_ok": True}))
    (logs / "tests.status").write_text("failed 1 40 120\n")
    (logs / "tests.log").write_text("1 failed, 49 passed\n")
    (logs / "tests.xml").write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="0" '
                                    'failures="1" skipped="1" tests="51"/></testsuites>')
    (logs / "sanitizer.status").write_text("skipped 0 0 0\n")
    (logs / "sanitizer.reason").write_text("compute-sanitizer not found\n")
    (logs / "kernels.status").write_text("timeout 124 96 96\n")
    (logs / "kernels.log").write_text("x" * 5000 + "END")
    (logs / "train.status").write_text("ok 0 150 288\n")
    (logs / "train.log").write_text("done\n")
    train = {"mfu": 0.41, "tfree_vs_classic_words_per_s": 1.1, "kinds": {"tfree": {"mfu": 0.41}, "classic": {"mfu": 0.45}}}
    (logs / "train_mfu.json").write_text(json.dumps(train))
    out = tmp_path / "run.json"
    res = subprocess.run([sys.executable, "-", str(out), str(logs), "400", "480", "--json", str(out)],
                         input=_assembler(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr  # a part failed / timed out
    r = json.loads(out.read_text())
    assert r["ok"] is False and r["exit_code"] == 1 and r["not_ok"] == ["tests", "kernels"]
    assert r["device"]["name"] == "NVIDIA H200"
    assert r["mfu"] == 0.41 and r["mfu_classic"] == 0.45 and r["tfree_vs_classic_words_per_s"] == 1.1
    assert r["seconds"] == 400 and r["time_budget_s"] == 480 and r["args"] == ["--json", str(out)]
    p = r["parts"]
    assert list(p) == ["build", "tests", "sanitizer", "kernels", "train"]
    assert p["build"]["status"] == "ok" and p["build"]["seconds"] == 95 and p["build"]["timeout_s"] == 168
    assert p["build"]["result"] == {"how": "JIT build", "smoke_ok": True}
    assert p["tests"]["status"] == "failed" and p["tests"]["exit_code"] == 1
    assert p["tests"]["result"] == {"tests": 51, "failures": 1, "errors": 0, "skipped": 1, "passed": 49}
    assert p["sanitizer"]["status"] == "skipped" and p["sanitizer"]["reason"] == "compute-sanitizer not found"
    assert p["sanitizer"]["result"] is None and p["sanitizer"]["exit_code"] is None and p["sanitizer"]["log"] is None
    assert p["kernels"]["status"] == "timeout" and p["kernels"]["exit_code"] == 124
    assert p["kernels"]["result"] is None and p["kernels"]["log_tail"].endswith("END")
    assert len(p["kernels"]["log_tail"]) == 3000
    assert p["train"]["status"] == "ok" and p["train"]["result"] == train

    for name in ("tests", "kernels"):  # all ok or skipped: exit 0
        (logs / f"{name}.status").write_text("ok 0 1 10\n")
    res = subprocess.run([sys.executable, "-", str(out), str(logs), "1", "480"], input=_assembler(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and json.loads(out.read_text())["ok"] is True


@no_gpu_only
def test_gpu_check_flow_with_a_faked_device(tmp_path):
    """The whole script on this CPU machine, with $PYTHON a wrapper that reports the CPU as the device and
    runs train_mfu.py as a tiny --dry-run (the other parts need a GPU: skipped by flag); the training
    part's figures land in the JSON."""
    wrapper = tmp_path / "python"
    tiny = " ".join(TINY + ["--peak-tflops", "1.0"])
    wrapper.write_text(f"""#!/usr/bin/env bash
if [ "$1" = benchmarks/train_mfu.py ] && [ "$2" = --device-info ]; then
    shift 2; exec "{sys.executable}" benchmarks/train_mfu.py --device-info --dry-run "$@"
fi
if [ "$1" = benchmarks/train_mfu.py ]; then
    shift; exec "{sys.executable}" benchmarks/train_mfu.py "$@" --dry-run --steps 2 --kinds tfree {tiny}
fi
exec "{sys.executable}" "$@"
""")
    wrapper.chmod(0o755)
    out = tmp_path / "gpu.json"
    res = subprocess.run(["bash", str(SCRIPT), "--json", str(out), "--quick", "--skip-build", "--skip-tests",
                          "--skip-sanitizer", "--skip-kernels"], cwd=tmp_path, env=_env(PYTHON=str(wrapper)), capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    r = json.loads(out.read_text())
    assert r["ok"] is True and r["not_ok"] == [] and r["device"]["name"].startswith("cpu (dry run")
    status = {n: p["status"] for n, p in r["parts"].items()}
    assert status == {"build": "skipped", "tests": "skipped", "sanitizer": "skipped", "kernels": "skipped",
                      "train": "ok"}
    assert r["parts"]["build"]["reason"] == "--skip-build" and r["parts"]["kernels"]["reason"] == "--skip-kernels"
    train = r["parts"]["train"]
    assert 20 <= train["timeout_s"] <= r["time_budget_s"] and train["result"]["kinds"]["tfree"]["steps_timed"] == 2
    assert r["mfu"] == train["result"]["kinds"]["tfree"]["mfu"] > 0 and r["mfu_classic"] is None
    assert Path(train["log"]).is_file() and Path(r["logs"]) == tmp_path / "gpu_logs"
