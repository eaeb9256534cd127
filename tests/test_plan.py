"""megatron_tfree.plan: layout checks (errors name the key), parameter and activation formulas checked
against real modules, memory per ZeRO stage, the 7B plan at 32x8 and other layouts, the CLI."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tfree.config import ConfigError, load_config
from megatron_tfree.model import GPTModel
from megatron_tfree.model.transformer import TransformerBlock, build_attention_meta
from megatron_tfree.plan import (GIB, check_layout, layer_activation_bytes, main, make_plan, param_counts,
                                 stage_layers)

REPO = Path(__file__).resolve().parents[1]
SEVEN_B = str(REPO / "configs" / "7b_fineweb.yaml")


def seven_b(*overrides):
    return load_config(SEVEN_B, list(overrides))


# ---------------------------------------------------------------------------------- formulas vs model


@pytest.mark.parametrize("kind", ["tfree", "classic"])
@pytest.mark.parametrize("kv", [0, 2])
def test_param_formula_equals_real_model(kind, kv):
    cfg = load_config(None, ["model.hidden_size=48", "model.num_layers=3", "model.num_attention_heads=4",
                             f"model.num_kv_heads={kv}", "model.mlp_factor=2.7", f"tokenizer.kind={kind}",
                             "tokenizer.vocab_size=320", "tokenizer.classic_vocab_size=200"])
    vocab = 320 if kind == "tfree" else 200
    model = GPTModel(cfg.model, kind, vocab, seed=0)
    counts = param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] == model.embedding.weight.numel()
    assert counts["blocks"] == sum(p.numel() for p in model.blocks.parameters())
    assert counts["output"] == sum(p.numel() for p in model.output.parameters())


def _saved_bytes(cfg, dtype, B, S):
    """Bytes (by storage) autograd saves in one real block's forward, parameters and the shared mask left out."""
    block = TransformerBlock(cfg.model, 0).to(dtype)
    x = torch.randn(B, S, cfg.model.hidden_size, dtype=dtype, requires_grad=True)
    meta = build_attention_meta(torch.arange(S).repeat(B, 1), torch.zeros(B, S, dtype=torch.long), dtype, "sdpa")
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, meta)
    skip = {p.untyped_storage().data_ptr() for p in block.parameters()} | {meta.mask.untyped_storage().data_ptr()}
    return sum(n for ptr, n in seen.items() if ptr not in skip)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
@pytest.mark.parametrize("kv", [4, 2])
def test_layer_activation_formula_equals_saved_tensors(precision, dtype, kv):
    cfg = load_config(None, ["model.hidden_size=64", "model.num_attention_heads=4", f"model.num_kv_heads={kv}",
                             f"training.precision={precision}"])
    B, S = 2, 32
    assert layer_activation_bytes(cfg, B * S, flash=False, seq_len=S) == _saved_bytes(cfg, dtype, B, S)


def test_flash_path_drops_mask_and_keeps_kv_heads():
    cfg = seven_b()
    T, h = 4096, 4096
    flash, sdpa = layer_activation_bytes(cfg, T, flash=True), layer_activation_bytes(cfg, T, flash=False)
    assert sdpa - flash == 2 * T * 4096  # the bf16 additive mask [S, S] (no grouped KV in the 7B config)
    assert 53 * T * h < flash < 55 * T * h  # ~54 T*h bytes (docstring)


# ------------------------------------------------------------------------------------------ layouts


def test_7b_on_32x8_plan():
    plan = make_plan(seven_b(), 32, 8)
    L = plan["layout"]
    assert (L["world"], L["tensor"], L["pipe"], L["data"]) == (256, 1, 1, 256)
    assert L["gradient_accumulation_steps"] == 4 and L["layers_per_stage"] == [32]
    assert plan["global_batch"] == {"sequences": 1024, "words_per_step": 1024 * 4096, "unit": "words"}
    P = plan["params"]["total"]
    assert 6.6e9 < P < 6.8e9 and plan["params_per_rank"]["max"] == P
    z = plan["stages"][0]["zero"]
    assert z[0] == {"weights": 2 * P, "grads": 2 * P, "optimizer": 12 * P}
    assert z[1]["optimizer"] == 12 * P / 256 and z[1]["grads"] == 2 * P
    assert z[2]["grads"] == 2 * P / 256 and z[2]["weights"] == 2 * P
    assert z[3]["weights"] == 2 * P / 256
    act = plan["stages"][0]["activations"]
    assert act["checkpointing"]["total"] < act["no_checkpointing"]["total"] / 5
    assert plan["fits"] and 20 * GIB < plan["total_bytes"] < 40 * GIB  # ZeRO-1 + checkpointing


def test_tensor_and_pipeline_shard_parameters():
    cfg = seven_b("parallel.tensor=2", "parallel.pipe=4")
    plan = make_plan(cfg, 4, 8)
    L = plan["layout"]
    assert (L["data"], L["gradient_accumulation_steps"], L["layers_per_stage"]) == (4, 256, [8, 8, 8, 8])
    total, per_stage = plan["params"]["total"], plan["params_per_rank"]["per_stage"]
    h, v = 4096, 32000
    norms_replicated = 32 * 2 * h + h  # RMSNorm weights are not split over TP
    assert 2 * sum(per_stage) == total + norms_replicated
    assert per_stage[0] - per_stage[1] == v // 2 * h  # the first stage also holds the embedding
    # stage s keeps min(pp - s, gas) micro-batches in flight
    assert [s["activations"]["checkpointing"]["in_flight"] for s in plan["stages"]] == [4, 3, 2, 1]


def test_stage_split_and_gas_without_global_batch():
    assert stage_layers(30, 4) == [8, 8, 7, 7] and stage_layers(4, 4) == [1, 1, 1, 1]
    cfg = seven_b("training.global_batch_size=0", "training.gradient_accumulation_steps=3")
    layout = check_layout(cfg, 2, 8)
    assert layout.gradient_accumulation_steps == 3 and layout.global_batch_size == 3 * 16


@pytest.mark.parametrize("overrides,nodes,gpus,key", [
    (["parallel.tensor=3"], 1, 6, "parallel.tensor"),  # 32 heads
    (["model.num_kv_heads=4", "parallel.tensor=8"], 1, 8, "parallel.tensor (8) must divide the number of KV heads"),
    (["parallel.tensor=16"], 1, 8, "--gpus-per-node"),  # world 8 not divisible by 16
    (["parallel.tensor=2", "tokenizer.vocab_size=32001"], 1, 8, "tokenizer.vocab_size"),
    (["parallel.tensor=2", "model.mlp_factor=2.666748046875"], 1, 8, "model.mlp_factor"),  # inner size 10923
    (["parallel.pipe=3"], 1, 8, "parallel.pipe"),  # 8 % 3
    ([], 3, 8, "training.global_batch_size"),  # 1024 % 24
    ([], 0, 8, "--nodes"),
])
def test_layout_errors_name_the_key(overrides, nodes, gpus, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        make_plan(seven_b(*overrides), nodes, gpus)


def test_pipe_deeper_than_layers_is_refused():
    with pytest.raises(ConfigError, match=r"parallel\.pipe.*model\.num_layers"):
        make_plan(load_config(None, ["model.num_layers=2", "parallel.pipe=4"]), 1, 4)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["--config", SEVEN_B, "--nodes", "32", "--gpus-per-node", "8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tensor 1 x pipe 1 x data 256" in text and "4,194,304 words per step" in text
    for words in ("optimizer+grads+weights", "act(ckpt)", "fits in 80 GiB"):
        assert words in text
    data = json.loads(out.read_text())
    assert data["layout"]["world"] == 256 and data["zero_stage"] == 1 and set(data["stages"][0]["zero"]) == {
        "0", "1", "2", "3"}


def test_cli_errors_exit_2_naming_the_key(capsys):
    assert main(["--config", SEVEN_B, "--nodes", "1", "parallel.tensor=3"]) == 2
    assert "parallel.tensor" in capsys.readouterr().err
    assert main(["--config", SEVEN_B, "training.no_such_key=1"]) == 2
    assert "training.no_such_key" in capsys.readouterr().err


def test_cli_help_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "megatron_tfree.plan", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--gpus-per-node" in out.stdout and "--json" in out.stdout


def test_cli_json_to_stdout_and_config_required(capsys):
    assert main(["--config", SEVEN_B, "--nodes", "32", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"]["world"] == 256
    with pytest.raises(SystemExit) as e:
        main(["--nodes", "2"])
    assert e.value.code == 2 and "--config is required (unless --sweep)" in capsys.readouterr().err
