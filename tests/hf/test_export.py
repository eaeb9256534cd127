"""convert2hf: checkpoints of both kinds saved at (TP, PP) = (1, 1) and (2, 2) exported and loaded with
transformers (offline): logits equal the native ones within 1e-5 in fp32 (T-Free: the raw trigram logits
and the dictionary scores), greedy generations equal InferencePipe's (batched, left-padded, with prompt
words outside the dictionary), and the generation API works as for any model (sampling, beam search,
KV cache, pipeline). Also: sharding, dtype, the model card, atomic writes and the CLI."""

from __future__ import annotations

import ast
import json

import pytest
import torch

from megatron_tfree.hf.export import export
from megatron_tfree.inference import InferencePipe

TEXT = "The king and the queen speak of Verona,  at night.\nA storm!"
PROMPTS = ["the king", "A lady of Verona and the", "Sea"]
LAYOUTS = [(1, 1), (2, 2)]


def _hf(path, remote):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote)
    return tok, model.eval()


def _greedy(tok, model, prompts, **kwargs):
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, **kwargs)
    return tok.batch_decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module")
def exported(hf_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_export")
    made = {}

    def get(kind, tp, pp):
        if (kind, tp, pp) not in made:
            made[kind, tp, pp] = export(hf_checkpoints(kind, tp, pp), out / f"{kind}_tp{tp}pp{pp}")
        return hf_checkpoints(kind, tp, pp), made[kind, tp, pp]

    return get


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS, ids=["tp1pp1", "tp2pp2"])
def test_classic_is_a_plain_llama_with_the_same_logits(exported, layout):
    run_dir, path = exported("classic", *layout)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md", "training_config.yaml"} <= names
    assert not any(n.endswith(".py") for n in names)  # no custom code
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    tok, model = _hf(path, remote=False)
    assert type(model).__name__ == "LlamaForCausalLM"
    native = InferencePipe.from_checkpoint(run_dir)
    with torch.no_grad():
        hf = model(**tok(TEXT, return_tensors="pt")).logits[0]
    torch.testing.assert_close(hf, native.logits(TEXT), rtol=0, atol=1e-5)
    assert _greedy(tok, model, PROMPTS) == [p + native.generate(p, max_words=6) for p in PROMPTS]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS, ids=["tp1pp1", "tp2pp2"])
def test_tfree_logits_scores_and_greedy_generation_match_native(exported, layout):
    run_dir, path = exported("tfree", *layout)
    tok, model = _hf(path, remote=True)
    native = InferencePipe.from_checkpoint(run_dir)
    enc = tok(TEXT, return_tensors="pt")
    assert tok.convert_ids_to_tokens(enc["input_ids"][0]) == native.units(TEXT)  # words, incl. "Verona"
    with torch.no_grad():
        out = model(**enc)
    expected = native.logits(TEXT)
    torch.testing.assert_close(out.trigram_logits[0], expected, rtol=0, atol=1e-5)
    n = len(native.dictionary)
    scores = native.dictionary.score(expected)
    torch.testing.assert_close(out.logits[0, :, :n] / model.config.logit_scale, scores, rtol=0, atol=1e-5)
    assert out.logits.shape[-1] > n  # "Verona" is not in the dictionary: an extra word, scored too
    assert tok.decode(enc["input_ids"][0]) == TEXT  # exact
    assert _greedy(tok, model, PROMPTS) == [p + native.generate(p, max_words=6) for p in PROMPTS]


@pytest.mark.distributed
def test_tfree_generation_api(exported):
    from transformers import pipeline

    _, path = exported("tfree", 1, 1)
    tok, model = _hf(path, remote=True)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert batch["attention_mask"][2].tolist()[0] == 0  # left padding
    greedy = _greedy(tok, model, PROMPTS)
    assert _greedy(tok, model, PROMPTS, use_cache=False) == greedy  # KV cache == recompute
    torch.manual_seed(0)
    sampled = model.generate(**batch, max_new_tokens=6, do_sample=True, temperature=1.0, top_k=20, top_p=0.95)
    torch.manual_seed(0)
    assert torch.equal(sampled, model.generate(**batch, max_new_tokens=6, do_sample=True, temperature=1.0, top_k=20,
                                                top_p=0.95))
    assert all(t.startswith(p) for t, p in zip(tok.batch_decode(sampled, skip_special_tokens=True), PROMPTS))
    beams = model.generate(**batch, max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams.shape[0] == len(PROMPTS) and beams.shape[1] <= batch["input_ids"].shape[1] + 4
    more = _greedy(tok, model, ["the king"], more_words=["zebra"], edge_weight=0.5)
    assert more[0].startswith("the king")
    gen = pipeline("text-generation", model=str(path), trust_remote_code=True)
    assert gen("the king", max_new_tokens=6, do_sample=False)[0]["generated_text"] == greedy[0]


def test_remote_code_needs_only_torch_and_transformers(exported):
    _, path = exported("tfree", 1, 1)
    allowed = {"torch", "transformers", "numpy", "__future__", "json", "os", "sys", "types", "re", "math",
               "hashlib", "inspect", "functools", "warnings", "dataclasses", "typing"}
    for file in path.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module]
            else:
                continue
            assert {m.split(".")[0] for m in mods} <= allowed, (file.name, mods)
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_tfree.TFreeConfig",
                                  "AutoModelForCausalLM": "modeling_tfree.TFreeForCausalLM"}
    assert json.loads((path / "tokenizer_config.json").read_text())["auto_map"]["AutoTokenizer"][0] == \
        "tokenization_tfree.TFreeTokenizer"


def test_sharded_bf16_export_loads(hf_checkpoints, tmp_path):
    from safetensors import safe_open

    run_dir = hf_checkpoints("tfree", 1, 1)
    path = export(run_dir, tmp_path / "bf16", dtype="bf16", max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (path / "model.safetensors").exists()
    with safe_open(str(path / index["weight_map"]["lm_head.weight"]), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    with safe_open(str(path / index["weight_map"]["words.input_ids"]), "pt") as f:
        assert f.get_tensor("words.input_ids").dtype == torch.int32  # the dictionary stays integer
    tok, model = _hf(path, remote=True)
    native = InferencePipe.from_checkpoint(run_dir)
    with torch.no_grad():
        got = model(**tok(TEXT, return_tensors="pt")).trigram_logits[0]
    torch.testing.assert_close(got, native.logits(TEXT), rtol=0.05, atol=0.05)


def test_model_card_and_training_config(exported):
    from megatron_tfree.checkpoint import CheckpointReader
    from megatron_tfree.config import load_config
    from megatron_tfree.hf.model_card import parameter_counts

    run_dir, path = exported("tfree", 1, 1)
    card = (path / "README.md").read_text()
    counts = parameter_counts(CheckpointReader(run_dir))
    assert counts["embedding_and_head"] == 2 * 512 * 32 and counts["total"] == sum(
        p.numel() for p in InferencePipe.from_checkpoint(run_dir).model.parameters())
    assert f"embedding + head {counts['embedding_and_head']:,}" in card and "steps: 2 optimizer steps" in card
    assert "trust_remote_code=True" in card and "temperature=t / 20" in card
    assert load_config(path / "training_config.yaml") == load_config(run_dir / "step_2" / "config.yaml")


def test_export_is_atomic_and_never_overwrites(hf_checkpoints, tmp_path, monkeypatch):
    from megatron_tfree.checkpoint import safetensors_stream

    run_dir = hf_checkpoints("tfree", 1, 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        export(run_dir, out)
    real = safetensors_stream.SafetensorsWriter.write
    calls = []

    def failing(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk full (simulated)")
        real(self, name, tensor)

    monkeypatch.setattr(safetensors_stream.SafetensorsWriter, "write", failing)
    with pytest.raises(OSError, match="simulated"):
        export(run_dir, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep.txt").read_text() == "mine"


def test_cli(hf_checkpoints, tmp_path, capsys):
    from megatron_tfree import convert2hf

    run_dir = hf_checkpoints("classic", 1, 1)
    assert convert2hf.main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "c"), "--dtype", "fp16"]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["dtype"] == "float16"
    assert convert2hf.main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "c")]) == 2
    assert convert2hf.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "exists; pass --force" in err and "does not exist" in err and "Traceback" not in err
