"""Checkpoints across layouts: a run saved at (TP=2, PP=2) is consolidated (layout-free full fp32
weights + Adam moments, :mod:`megatron_tfree.training.consolidate`) and resumed at (1, 1, 1) and
(1, 2, 1): the next 3 losses equal those of the uninterrupted (2, 2) run (3 steps, so missing or
misplaced Adam moments or a wrong step count would show). Also: the consolidated weights are the
gathered full weights, an existing output is not overwritten, inference reads the consolidated
directory (same logits as the resumed engine's module) and the TP/PP DeepSpeed checkpoint itself, the
CLI writes it back as a (1, 1, 2) ZeRO-1 / ZeRO-3 DeepSpeed checkpoint that resumes exactly, and
zeroed Adam moments make the comparison fail (the test can see them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from distributed import run_distributed

N, MORE = 3, 3  # save at N, compare steps N+1 .. N+MORE
RTOL = 1e-5
PROMPT = "the king and the queen speak"


def _sections(tp: int, pp: int, **training):
    return dict(model={"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "dropout": 0.0,
                       "mlp_factor": 2.68},
                training={"train_iterations": N + MORE, "micro_batch_size": 1, "global_batch_size": 4,
                          "precision": "fp32", "eval_iterations": 0, "save_interval": N, **training},
                parallel={"tensor": tp, "pipe": pp, "zero_stage": 0})


def _train_source(rank, world, cfg):
    """Train at the source layout; at step N every stage's (tp 0, dp 0) rank returns its full weights."""
    from megatron_tfree.parallel import state
    from megatron_tfree.parallel.init import full_weight
    from megatron_tfree.training import train
    from megatron_tfree.training.consolidate import named_model_params

    gathered = {}

    def hook(step, engine, record):
        if step == N:
            for name, p in named_model_params(engine.module):
                gathered[name] = full_weight(p).detach().numpy().copy()  # numpy: pickled by value

    losses = train(cfg, on_step=hook).losses
    s = state.get()
    return losses, gathered if s.tp_rank == 0 and s.dp_rank == 0 else {}


def _train_resumed(rank, world, cfg, with_logits):
    """Resume from the consolidated dir at this layout; optionally first the loaded module's logits."""
    from megatron_tfree.training import train

    logits = None
    if with_logits:
        from megatron_tfree.inference.pipe import InferencePipe
        from megatron_tfree.tokenizer import load_tokenizer
        from megatron_tfree.training import checkpoint as ckpt
        from megatron_tfree.training.engine import build_engine, build_model

        tokenizer = load_tokenizer(Path(cfg.training.load_dir) / ckpt.TOKENIZER_DIR)
        engine, _, _ = build_engine(cfg, build_model(cfg, tokenizer.vocab_size))
        ckpt.load_checkpoint(engine, Path(cfg.training.load_dir).parent, Path(cfg.training.load_dir).name)
        with torch.no_grad():
            logits = InferencePipe(engine.module, tokenizer).logits(PROMPT).numpy().copy()
        del engine
    return train(cfg).losses, logits


@pytest.fixture(scope="module")
def source(cfg_factory, tmp_path_factory):
    """The (TP=2, PP=2) run to N + MORE (checkpoint at N) and its consolidation."""
    out = tmp_path_factory.mktemp("reshard")
    cfg = cfg_factory(out, "tp2pp2", **_sections(2, 2))
    start = time.perf_counter()
    results = run_distributed(_train_source, world=4, args=(cfg,), timeout=240)
    train_s = time.perf_counter() - start
    gathered = {k: torch.from_numpy(v) for _, g in results for k, v in g.items()}
    from megatron_tfree.training.consolidate import to_consolidated

    start = time.perf_counter()
    consolidated = to_consolidated(Path(cfg.training.save_dir) / f"step_{N}", out / "consolidated")
    print(f"\nsource run {train_s:.1f} s, consolidation {time.perf_counter() - start:.1f} s")
    return {"out": out, "run_dir": Path(cfg.training.save_dir), "losses": results[0][0], "gathered": gathered,
            "consolidated": consolidated}


@pytest.mark.distributed
def test_consolidated_holds_full_weights_and_moments(source):
    from safetensors.torch import load_file

    from megatron_tfree.training import consolidate

    c = source["consolidated"]
    weights = load_file(str(c / consolidate.MODEL_FILE))
    from megatron_tfree.config import load_config
    from megatron_tfree.model import GPTModel

    cfg = load_config(c / "config.yaml")
    names = sorted(GPTModel(cfg.model, "tfree", cfg.tokenizer.vocab_size, seed=0).state_dict())
    assert sorted(weights) == sorted(source["gathered"]) == names
    for name, full in source["gathered"].items():
        assert torch.equal(weights[name], full), name
    assert weights["blocks.0.mlp.gate_up.weight"].shape == (2 * 85, 32)  # SwiGLU gate|up, uneven TP=2 split
    moments = load_file(str(c / consolidate.OPTIMIZER_FILE))
    assert sorted(moments) == sorted(f"{k}.{n}" for k in consolidate.MOMENTS for n in weights)
    assert all(moments[f"exp_avg_sq.{n}"].abs().sum() > 0 for n in weights)  # trained moments, not zeros
    meta = json.loads((c / consolidate.MARKER_FILE).read_text())
    assert meta["optimizer"]["step"] == N and meta["scheduler"] == {"num_updates": N}
    assert meta["source"] == {**meta["source"], "tensor": 2, "pipe": 2, "data": 1, "zero_stage": 0}
    assert json.loads((c / "trainer_state.json").read_text())["consumed_samples"] == 4 * N
    assert {"config.yaml", "tokenizer", "word_counts.json", "rng_state_rank0.json"} <= {p.name for p in c.iterdir()}
    assert not list(c.glob("*.pt")) and not list(c.parent.glob(".consolidated.tmp*"))


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [(1, 1), (1, 2)], ids=["tp1-pp1-dp1", "tp1-pp2-dp1"])
def test_resume_at_other_layout_continues_exactly(source, cfg_factory, layout):
    tp, pp = layout
    cfg = cfg_factory(source["out"], f"resumed-tp{tp}pp{pp}",
                      **_sections(tp, pp, load_dir=str(source["consolidated"]), save_interval=100))
    with_logits = layout == (1, 1)
    start = time.perf_counter()
    losses, logits = run_distributed(_train_resumed, world=tp * pp, args=(cfg, with_logits), timeout=240)[0]
    ref = source["losses"]
    assert sorted(losses) == list(range(N + 1, N + MORE + 1))
    diffs = [abs(losses[s] - ref[s]) / abs(ref[s]) for s in sorted(losses)]
    print(f"\n(2,2,1) -> ({tp},{pp},1): relative loss diffs {', '.join(f'{d:.1e}' for d in diffs)}, "
          f"{time.perf_counter() - start:.1f} s")
    assert max(diffs) <= RTOL, (losses, ref)
    if with_logits:  # inference reads the consolidated dir directly: the same model
        from megatron_tfree.inference.pipe import InferencePipe

        with torch.no_grad():
            expected = InferencePipe.from_checkpoint(source["consolidated"]).logits(PROMPT)
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.distributed
def test_existing_output_is_not_overwritten(source):
    from megatron_tfree.training.consolidate import MARKER_FILE, to_consolidated

    c = source["consolidated"]
    before = (c / MARKER_FILE).read_text()
    with pytest.raises(FileExistsError, match=str(c)):
        to_consolidated(source["run_dir"], c)
    assert (c / MARKER_FILE).read_text() == before
    with pytest.raises(ValueError, match="already consolidated"):
        to_consolidated(c, source["out"] / "again")


@pytest.mark.distributed
def test_inference_reads_tp_pp_deepspeed_checkpoint(source):
    """Inference streams the (TP=2, PP=2) DeepSpeed files themselves (no conversion): exactly the
    gathered weights, and the same logits as from the consolidated directory."""
    from megatron_tfree.inference import loading
    from megatron_tfree.inference.pipe import InferencePipe

    direct = loading.load_model_state(source["run_dir"] / f"step_{N}")
    assert sorted(direct) == sorted(source["gathered"])
    for name, full in source["gathered"].items():
        assert torch.equal(direct[name], full), name
    with torch.no_grad():
        got = InferencePipe.from_checkpoint(source["run_dir"] / f"step_{N}").logits(PROMPT)
        expected = InferencePipe.from_checkpoint(source["consolidated"]).logits(PROMPT)
    assert torch.equal(got, expected)


def _cli():
    """tools/convert_checkpoint.py as a module (tools/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _resume(rank, world, cfg):
    from megatron_tfree.training import train

    return train(cfg).losses


@pytest.mark.distributed
@pytest.mark.parametrize("zero", [1, 3])
def test_to_deepspeed_zero_dp2_then_resume(source, cfg_factory, tmp_path, capsys, zero):
    """CLI back-conversion to a (1, 1, 2) ZeRO-1/3 DeepSpeed checkpoint (safe_set_full_* paths), resumed."""
    convert_checkpoint = _cli()
    out = tmp_path / f"ds-zero{zero}-dp2"
    assert convert_checkpoint.main([str(source["consolidated"]), str(out), "--to-deepspeed", "--layout", "1,1,2",
                                    "--zero-stage", str(zero)]) == 0
    assert (out / "latest").read_text().strip() == f"step_{N}"
    assert {p.name for p in (out / f"step_{N}").glob("*optim_states.pt")} == {
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)}
    sections = _sections(1, 1, load_dir=str(out), save_interval=100)
    sections["parallel"]["zero_stage"] = zero
    losses = run_distributed(_resume, world=2, args=(cfg_factory(tmp_path, "from-ds", **sections),), timeout=240)[0]
    ref = source["losses"]
    assert sorted(losses) == list(range(N + 1, N + MORE + 1))
    assert max(abs(losses[s] - ref[s]) / abs(ref[s]) for s in losses) <= RTOL, (losses, ref)
    assert convert_checkpoint.main([str(source["consolidated"]), str(out), "--to-deepspeed"]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.distributed
def test_missing_moments_would_be_caught(source, cfg_factory, tmp_path):
    """Negative control: the same resume with zeroed Adam moments misses the reference losses."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_tfree.training.consolidate import OPTIMIZER_FILE

    broken = tmp_path / "zero-moments"
    shutil.copytree(source["consolidated"], broken)
    moments = load_file(str(broken / OPTIMIZER_FILE))
    save_file({k: torch.zeros_like(v) for k, v in moments.items()}, str(broken / OPTIMIZER_FILE))
    cfg = cfg_factory(tmp_path, "broken", **_sections(1, 1, load_dir=str(broken), save_interval=100))
    losses = run_distributed(_resume, world=1, args=(cfg,), timeout=240)[0]
    ref = source["losses"]
    assert max(abs(losses[s] - ref[s]) / abs(ref[s]) for s in losses) > 100 * RTOL


def test_cli_help():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "tools" / "convert_checkpoint.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--to-deepspeed" in out.stdout and "--layout" in out.stdout
