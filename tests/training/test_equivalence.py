"""The equivalence matrix: the same tiny run (same seed, same global batch, same sample order) under
every (tensor, pipe, data) layout and ZeRO stage gives the per-step losses of the single-process run.

Each layout trains ``train(cfg)`` for 10 steps in ``tp * pp * dp`` gloo processes
(:func:`distributed.run_distributed`), fp32, dropout off. The global batch is 4 samples of micro-batch
1 (gradient accumulation 4 / dp), so every layout averages the same per-sample losses; the sampler's
global order gives data-parallel ranks disjoint parts of the same samples. The run also evaluates
(untrained and at the end) and saves a checkpoint at step 10 in every layout.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from distributed import run_distributed
from megatron_tfree.training.checkpoint import read_latest

STEPS = 10
RTOL = 1e-5
# below the tiny model's gradient norm, so clipping scales every step: a layout that counted
# TP-replicated (or pipeline/ZeRO-partitioned) parameters wrongly in the norm would diverge
CLIP = 0.01
# (tensor, pipe, data, zero stage)
LAYOUTS = [(1, 1, 1, 0), (2, 1, 1, 0), (1, 2, 1, 0), (1, 1, 2, 0), (2, 2, 1, 0), (2, 1, 2, 1),
           (1, 2, 2, 1), (1, 1, 2, 2), (1, 1, 2, 3)]
_reference: dict[str, dict] = {}


def layout_id(layout) -> str:
    tp, pp, dp, zero = layout
    return f"tp{tp}-pp{pp}-dp{dp}-zero{zero}"


def _train(rank, world, cfg):
    from megatron_tfree.training import train

    result = train(cfg)
    return {"losses": result.losses, "eval": result.last_eval}


def run_layout(cfg_factory, out_dir: Path, kind: str, layout) -> dict:
    tp, pp, dp, zero = layout
    tokenizer = {"kind": kind}
    if kind == "classic":  # one BPE for every layout (fitted by the first run)
        tokenizer.update(classic_vocab_size=512, tokenizer_file=str(out_dir.parent / "classic_bpe.json"))
    cfg = cfg_factory(out_dir, f"{kind}-{layout_id(layout)}",
                      model={"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "dropout": 0.0,
                             "mlp_factor": 2.0},
                      tokenizer=tokenizer,
                      training={"train_iterations": STEPS, "micro_batch_size": 1, "global_batch_size": 4,
                                "precision": "fp32", "eval_iterations": 1, "eval_interval": 100,
                                "save_interval": 100, "gradient_clipping": CLIP},
                      parallel={"tensor": tp, "pipe": pp, "zero_stage": zero})
    start = time.perf_counter()
    results = run_distributed(_train, world=tp * pp * dp, args=(cfg,), timeout=240)
    out = results[0]
    out["seconds"] = time.perf_counter() - start
    out["all_ranks_same"] = all(r["losses"] == out["losses"] for r in results)
    out["latest"] = read_latest(cfg.training.save_dir)
    out["tag_dir"] = Path(cfg.training.save_dir) / f"step_{STEPS}"
    from megatron_tfree.training.metrics import read_metrics

    out["grad_norms"] = {r["step"]: r["grad_norm"] for r in read_metrics(Path(cfg.training.save_dir) / "metrics.jsonl")}
    return out


def reference(cfg_factory, tmp_path_factory, kind: str) -> dict:
    if kind not in _reference:
        _reference[kind] = run_layout(cfg_factory, tmp_path_factory.mktemp(f"eq-{kind}"), kind, LAYOUTS[0])
    return _reference[kind]


def max_rel_diff(a: dict, b: dict) -> float:
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in b)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["tfree", "classic"])
@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=layout_id)
def test_layout_matches_single_process(cfg_factory, tmp_path_factory, kind, layout):
    ref = reference(cfg_factory, tmp_path_factory, kind)
    assert sorted(ref["losses"]) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in ref["losses"].values())
    got = run_layout(cfg_factory, tmp_path_factory.mktemp(f"eq-{kind}"), kind, layout)
    diff = max_rel_diff(got["losses"], ref["losses"])
    print(f"\n{kind} {layout_id(layout)}: max relative loss diff {diff:.2e}, {got['seconds']:.1f} s "
          f"(reference {ref['seconds']:.1f} s)")
    assert diff <= RTOL, (got["losses"], ref["losses"])
    # the (pre-clip) global gradient norm: every parameter counted once, whatever the layout
    assert min(ref["grad_norms"].values()) > CLIP  # clipping was active at every step
    norm_diff = max_rel_diff(got["grad_norms"], ref["grad_norms"])
    assert norm_diff <= 1e-4, (got["grad_norms"], ref["grad_norms"])
    assert got["all_ranks_same"]  # every rank reports the same (broadcast) losses
    assert math.isfinite(got["eval"]["eval_loss"]) and got["eval"].get("bits_per_byte", 1.0) > 0
    if layout[2] == 1:  # eval_iterations are per data-parallel rank: same held-out samples only at dp 1
        assert got["eval"]["eval_loss"] == pytest.approx(ref["eval"]["eval_loss"], rel=RTOL)
        assert got["eval"].get("bits_per_byte") == pytest.approx(ref["eval"].get("bits_per_byte"), rel=RTOL)
    assert got["latest"] == f"step_{STEPS}" and (got["tag_dir"] / "trainer_state.json").is_file()
    if layout[1] > 1:  # DeepSpeed pipeline checkpoints: one file per layer (embedding, blocks, output)
        assert sorted(p.name for p in got["tag_dir"].glob("layer_*-model_states.pt")) == [  # and TP shard
            f"layer_{i:02d}-model_{t:02d}-model_states.pt" for i in range(4) for t in range(layout[0])]


def _resume(rank, world, cfg_full, cfg_cut):
    from megatron_tfree.training import train

    full = train(cfg_full).losses
    first = train(cfg_cut, stop_after=3).losses  # interrupted after step 3 (checkpoint written)
    rest = train(cfg_cut).losses  # resumes from save_dir/latest
    return full, first, rest


@pytest.mark.distributed
def test_pipeline_zero1_resume_is_exact(cfg_factory, tmp_path):
    sections = dict(model={"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4},
                    training={"train_iterations": 5, "micro_batch_size": 1, "global_batch_size": 2,
                              "eval_iterations": 0, "save_interval": 100},
                    parallel={"pipe": 2, "zero_stage": 1})
    full, first, rest = run_distributed(
        _resume, world=2, args=(cfg_factory(tmp_path, "full", **sections), cfg_factory(tmp_path, "cut", **sections)))[0]
    assert sorted(first) == [1, 2, 3] and sorted(rest) == [4, 5]
    for step, loss in {**first, **rest}.items():
        assert loss == pytest.approx(full[step], rel=1e-6), step


def test_world_size_not_divisible_by_layout_names_the_keys(cfg_factory, tmp_path):
    from megatron_tfree.config import ConfigError
    from megatron_tfree.training import train

    cfg = cfg_factory(tmp_path, "bad", parallel={"tensor": 2, "pipe": 1})  # this process: world size 1
    with pytest.raises(ConfigError, match=r"parallel\.tensor \* parallel\.pipe"):
        train(cfg)
