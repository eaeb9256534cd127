"""The training loop end to end on a tiny model: ZeRO stages, gradient accumulation, non-finite
steps, metrics/plots, classic bits per byte, the DeepSpeed config, the CLI and the launchers."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tfree.config import ConfigError
from megatron_tfree.model import GPTModel
from megatron_tfree.training.engine import deepspeed_config, free_port
from megatron_tfree.training.loop import NonFiniteLossError, train
from megatron_tfree.training.metrics import read_metrics
from megatron_tfree.train import build_parser

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_train_and_loss_falls(tiny_cfg, stage):
    cfg = tiny_cfg(f"zero{stage}", parallel={"zero_stage": stage}, training={"train_iterations": 8})
    result = train(cfg)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.05, losses
    assert math.isfinite(result.last_eval["eval_loss"])


def _snapshots(store):
    def hook(step, engine, record):
        store[step] = ({n: p.detach().clone() for n, p in engine.module.named_parameters()}, record)
    return hook


def test_gradient_accumulation_matches_larger_micro_batch(tiny_cfg):
    accum, big = {}, {}
    # micro 2 x accumulation 2, accumulation derived from global_batch_size
    r1 = train(tiny_cfg("accum", training={"train_iterations": 3, "global_batch_size": 4}), on_step=_snapshots(accum))
    r2 = train(tiny_cfg("big", training={"train_iterations": 3, "micro_batch_size": 4}), on_step=_snapshots(big))
    for step in (1, 2, 3):
        assert r1.losses[step] == pytest.approx(r2.losses[step], rel=1e-5, abs=1e-6)
        assert accum[step][1]["consumed_samples"] == big[step][1]["consumed_samples"] == 4 * step
        for name, p in accum[step][0].items():
            torch.testing.assert_close(p, big[step][0][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage", [0, 2])
def test_non_finite_loss_skips_counts_and_stops(tiny_cfg, monkeypatch, stage):
    calls = {"n": 0}
    real = GPTModel.forward

    def poisoned(self, batch, kv_cache=None, return_loss=False):  # one loss per training step (no accumulation)
        out = real(self, batch, kv_cache, return_loss)
        if not return_loss:
            return out
        calls["n"] += 1
        return out * float("nan") if calls["n"] in (2, 4) else out

    monkeypatch.setattr(GPTModel, "forward", poisoned)
    cfg = tiny_cfg("nan", parallel={"zero_stage": stage},
                   training={"max_skipped_steps": 1, "eval_iterations": 0, "train_iterations": 6})
    snaps = {}
    with pytest.raises(NonFiniteLossError, match="training.max_skipped_steps=1"):
        train(cfg, on_step=_snapshots(snaps))
    assert sorted(snaps) == [1, 2, 3]  # step 4 was the second skip: the run stopped there
    p1, p2, p3 = (snaps[s][0] for s in (1, 2, 3))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)  # skipped step: no update
    assert any(not torch.equal(p2[k], p3[k]) for k in p2)  # the next step updates again
    assert snaps[2][1]["skipped"] and snaps[3][1]["lr"] == snaps[2][1]["lr"]  # schedule held
    assert all(torch.isfinite(p).all() for p in p3.values())
    records = [r for r in read_metrics(Path(cfg.training.save_dir) / "metrics.jsonl")]
    assert [r["skipped"] for r in records] == [False, True, False, True]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None
    assert (Path(cfg.training.save_dir) / "loss.png").is_file()  # drawn even for a failed run


def test_metrics_plot_tensorboard_and_word_counts(tiny_cfg):
    cfg = tiny_cfg("metrics", training={"train_iterations": 4, "eval_interval": 2, "tensorboard": True})
    train(cfg)
    run = Path(cfg.training.save_dir)
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one object per training step
    # the untrained model's evaluation travels with step 1
    assert records[0]["initial_eval_loss"] > 0 and records[0]["initial_bits_per_byte"] > 0
    assert not any("initial_eval_loss" in r for r in records[1:])
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "words_per_s"} <= set(r)
        assert r["loss"] > 0 and r["lr"] > 0 and r["grad_norm"] > 0 and r["words_per_s"] > 0
    assert [("eval_loss" in r) for r in records] == [False, True, False, True]
    assert [("bits_per_byte" in r) for r in records] == [False, True, False, True]  # T-Free bits per byte
    assert (run / "loss.png").stat().st_size > 1000
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    assert (run / "step_4" / "word_counts.json").is_file()


def test_classic_tokenizer_reports_bits_per_byte(tiny_cfg, tiny_corpus, tmp_path):
    from megatron_tfree.tokenizer.classic import ClassicTokenizer

    tok_file = tmp_path / "bpe.json"
    ClassicTokenizer.train(tiny_corpus[2], vocab_size=300).save_file(tok_file)
    cfg = tiny_cfg("classic", tokenizer={"kind": "classic", "tokenizer_file": str(tok_file)},
                   training={"train_iterations": 3})
    result = train(cfg)
    ev = result.last_eval
    assert ev["eval_loss"] > 0 and 0 < ev["bits_per_byte"] < 16
    # a token's CE in nats over its bytes: bits/byte = CE * tokens / bytes / ln 2 <= CE / ln 2
    assert ev["bits_per_byte"] < ev["eval_loss"] / math.log(2)


def test_deepspeed_config_from_config(tiny_cfg):
    cfg = tiny_cfg(training={"global_batch_size": 8, "precision": "bf16", "gradient_clipping": 0.5},
                   parallel={"zero_stage": 2})
    ds = deepspeed_config(cfg, dp_world=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["steps_per_print"] >= 10**9 and ds["wall_clock_breakdown"] is False
    with pytest.raises(ConfigError, match="training.global_batch_size"):
        deepspeed_config(cfg, dp_world=3)


def test_cli_parses_overrides_and_launcher_local_rank():
    args = build_parser().parse_args(["--config", "c.yaml", "training.lr=1e-3", "--local_rank=1"])
    assert args.config == "c.yaml" and args.overrides == ["training.lr=1e-3"] and args.local_rank == 1
    out = subprocess.run([sys.executable, "-m", "megatron_tfree.train", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "section.key=value" in out.stdout


# --------------------------------------------------------------------------------------------------
# launchers (2 gloo processes each)
# --------------------------------------------------------------------------------------------------


def _launch(cmd, cfg, tmp_path, dp=2):
    path = tmp_path / "cfg.yaml"
    cfg.save(path)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*cmd, "--config", str(path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_metrics(Path(cfg.training.save_dir) / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["consumed_samples"] == 3 * 2 * dp  # micro 2 x data-parallel ranks
    assert (Path(cfg.training.save_dir) / "latest").read_text().strip() == "step_3"
    assert (Path(cfg.training.save_dir) / "step_3" / "rng_state_rank1.json").is_file()
    return proc


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes(tiny_cfg, tmp_path):
    cfg = tiny_cfg("torchrun", training={"train_iterations": 3}, parallel={"zero_stage": 1})
    torchrun = Path(sys.executable).with_name("torchrun")
    _launch([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
             str(free_port()), "-m", "megatron_tfree.train"], cfg, tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_tensor_parallel_ends_with_a_sample(tiny_cfg, tmp_path):
    """A TP=2 run ends with the generation from its own (TP-sharded) checkpoint, read directly."""
    cfg = tiny_cfg("torchrun-tp2", training={"train_iterations": 3, "sample_prompt": "The king", "sample_words": 5},
                   parallel={"tensor": 2})
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = _launch([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                    str(free_port()), "-m", "megatron_tfree.train"], cfg, tmp_path, dp=1)
    assert "sample (greedy, 5 words) from 'The king':" in proc.stdout and "Traceback" not in proc.stderr
    assert (Path(cfg.training.save_dir) / "step_3" / "mp_rank_01_model_states.pt").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_launcher_two_processes(tiny_cfg, tmp_path):
    cfg = tiny_cfg("dslaunch", training={"train_iterations": 3})
    launcher = Path(sys.executable).with_name("deepspeed")
    _launch([str(launcher), "--num_nodes", "1", "--num_gpus", "2", "--master_port", str(free_port()),
             str(REPO / "megatron_tfree" / "train.py")], cfg, tmp_path)


def test_classic_bits_is_cross_entropy_over_bytes():
    from megatron_tfree.data.batch import Batch
    from megatron_tfree.training.loop import classic_bits

    B, S, V = 1, 3, 4
    z = torch.zeros(B * S + 1, dtype=torch.long)
    batch = Batch(input_offsets=z, input_ids=z[:0], target_offsets=torch.arange(B * S + 1),
                  target_ids=torch.tensor([1, 2, 3]), position_ids=torch.zeros(B, S, dtype=torch.long),
                  document_ids=torch.zeros(B, S, dtype=torch.long),
                  loss_weights=torch.tensor([[1.0, 1.0, 0.0]]), target_bytes=torch.tensor([[3, 5, 7]]))
    bits, nbytes = classic_bits(None, batch, torch.zeros(B, S, V))  # uniform: 2 bits per token
    assert bits == pytest.approx(4.0) and nbytes == 8.0  # the weight-0 position does not count


def test_cli_reports_config_errors_by_key(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megatron_tfree.train", "training.no_such_key=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "training.no_such_key" in out.stderr
