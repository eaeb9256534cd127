"""Hugging Face Llama import: tiny random LlamaForCausalLM folders made here (no hub), imported layout-free
or at a layout, give transformers' logits within 1e-5; HF -> native -> HF and native -> HF -> native are
identical tensors; generation and training start from the import; errors name the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_tfree.checkpoint import CheckpointReader
from megatron_tfree.hf.export import export
from megatron_tfree.hf.importing import import_checkpoint
from megatron_tfree.inference import InferencePipe

TEXT = "the king and the queen speak of the storm at sea"
CORPUS = ["the king and the queen speak of the storm at sea, the lord and the lady hear the rain."] * 30


def make_llama(path: Path, bias: bool = False, tie: bool = False, shard: str = "40KB", seed: int = 0) -> Path:
    """A random tiny LlamaForCausalLM (GQA) with a BPE tokenizer, saved like any HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from megatron_tfree.tokenizer import ClassicTokenizer

    tok = ClassicTokenizer.train(CORPUS, vocab_size=300, min_frequency=1)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, attention_bias=bias,
                         mlp_bias=bias, tie_word_embeddings=tie, max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)  # not the trivial init
    model.save_pretrained(path, max_shard_size=shard)
    PreTrainedTokenizerFast(tokenizer_object=tok.hf_tokenizer, eos_token="<|endoftext|>").save_pretrained(path)
    return path


def hf_logits(path: Path, text: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits[0]


@pytest.mark.parametrize("bias,tie", [(False, False), (True, True)], ids=["plain", "bias-tied"])
def test_import_matches_transformers(tmp_path, bias, tie):
    src = make_llama(tmp_path / "hf", bias=bias, tie=tie)
    assert (src / "model.safetensors.index.json").is_file()  # sharded
    out = import_checkpoint(src, tmp_path / "native")
    pipe = InferencePipe.from_checkpoint(out)
    torch.testing.assert_close(pipe.logits(TEXT), hf_logits(src, TEXT), rtol=0, atol=1e-5)
    cfg = CheckpointReader(out).cfg
    assert (cfg.model.ffn_hidden_size, cfg.model.num_kv_heads, cfg.model.bias) == (72, 2, bias)
    assert cfg.model.rotary_embedding_base == 5000.0 and cfg.tokenizer.kind == "classic"
    assert pipe.generate("the king", max_words=4)  # generation works on the import


def test_round_trips_are_exact(tmp_path, hf_checkpoints):
    src = make_llama(tmp_path / "hf")
    native = import_checkpoint(src, tmp_path / "native")
    back = export(native, tmp_path / "hf2", max_shard_size="40KB")
    original = {k: v for f in src.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    again = {k: v for f in back.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert sorted(original) == sorted(again)
    assert all(torch.equal(original[k], again[k]) for k in original)  # HF -> native -> HF

    run_dir = hf_checkpoints("classic", 1, 1)
    exported = export(run_dir, tmp_path / "hf3")
    reimported = import_checkpoint(exported, tmp_path / "native3")
    first, second = CheckpointReader(run_dir).state_dict(), CheckpointReader(reimported).state_dict()
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[k], second[k]) for k in first)  # native -> HF -> native


@pytest.mark.distributed
def test_import_at_a_layout_and_train_from_it(tmp_path, cfg_factory):
    from megatron_tfree.training.loop import train

    src = make_llama(tmp_path / "hf")
    tag = import_checkpoint(src, tmp_path / "pp2", layout=(1, 2, 1))
    assert tag.name == "step_0" and (tag.parent / "latest").read_text().strip() == "step_0"
    assert (tag / "layer_01-model_00-model_states.pt").is_file()
    torch.testing.assert_close(InferencePipe.from_checkpoint(tag.parent).logits(TEXT), hf_logits(src, TEXT),
                               rtol=0, atol=1e-5)
    native = import_checkpoint(src, tmp_path / "native")
    cfg = cfg_factory(tmp_path, "finetune", model={"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
                                                   "num_kv_heads": 2, "ffn_hidden_size": 72, "rotary_embedding_base": 5000.0},
                      tokenizer={"kind": "classic"},
                      training={"init_from": str(native), "train_iterations": 2, "eval_iterations": 0})
    losses = train(cfg).losses
    assert sorted(losses) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_broken_sources_name_the_problem(tmp_path):
    src = make_llama(tmp_path / "hf")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]

    broken = shutil.copytree(src, tmp_path / "missing-shard")
    (broken / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        import_checkpoint(broken, tmp_path / "o1")

    broken = shutil.copytree(src, tmp_path / "extra-key")
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = shard
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.0.mlp.extra.weight'\]"):
        import_checkpoint(broken, tmp_path / "o2")

    broken = shutil.copytree(src, tmp_path / "wrong-config")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(ValueError, match="mlp.gate_up.weight"):
        import_checkpoint(broken, tmp_path / "o3")

    (broken / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}))
    with pytest.raises(ValueError, match="rotary scaling"):
        import_checkpoint(broken, tmp_path / "o4")

    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(FileExistsError, match="--force"):
        import_checkpoint(src, out)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind


def test_cli(tmp_path, capsys):
    from megatron_tfree import generate, import_checkpoint as cli

    src = make_llama(tmp_path / "hf")
    assert cli.main([str(src), str(tmp_path / "native"), "training.lr=1e-4"]) == 0
    assert "imported hf-llama checkpoint" in capsys.readouterr().out
    assert CheckpointReader(tmp_path / "native").cfg.training.lr == 1e-4
    assert generate.main(["--checkpoint", str(tmp_path / "native"), "--prompt", "the king", "--max-words", "3"]) == 0
    assert capsys.readouterr().out.startswith("the king")
    assert cli.main([str(src), str(tmp_path / "native")]) == 2
    assert cli.main([str(tmp_path), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "exists; pass --force" in err and "neither a Hugging Face folder" in err and "Traceback" not in err
