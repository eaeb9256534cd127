"""Parameter inheritance: nothing pruned gives the same logits; kept rows/columns are the source's exactly;
an inherited model starts clearly below a random one of its shape; layer and width selection by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_tfree.checkpoint import CheckpointReader
from megatron_tfree.inherit.__main__ import main
from megatron_tfree.inherit.build import calibration_batches, inherit
from megatron_tfree.inherit.importance import entry_scores, even_layers, layer_importance, top, width_scores
from megatron_tfree.inherit.shape import Dims, check_shapes

BIG = {"hidden_size": 64, "num_layers": 3, "num_attention_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 96,
       "init": "normal"}
SMALL = {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 2, "num_kv_heads": 1, "ffn_hidden_size": 40,
         "init": "normal"}


@pytest.fixture(scope="module")
def big_run(cfg_factory, tmp_path_factory):
    from distributed import train_rank

    cfg = cfg_factory(tmp_path_factory.mktemp("inherit"), "big", model=BIG,
                      training={"train_iterations": 40, "eval_iterations": 0})
    train_rank(0, 1, cfg)
    return cfg


def _small_cfg(big_cfg, tmp_path, **model):
    cfg = copy.deepcopy(big_cfg)
    for k, v in {**SMALL, **model}.items():
        setattr(cfg.model, k, v)
    cfg.training.save_dir = str(tmp_path / "small_run")
    return cfg


def test_selection_helpers_by_hand():
    assert even_layers(6, 3) == [0, 2, 5] and even_layers(5, 3) == [0, 2, 4] and even_layers(4, 4) == [0, 1, 2, 3]
    assert even_layers(7, 1) == [0]
    assert top(torch.tensor([0.5, 3.0, 1.0, 3.0]), 2).tolist() == [1, 3]  # the largest, in index order
    assert top(torch.tensor([2.0, 2.0, 1.0]), 1).tolist() == [0]  # ties: the lower index


def test_nothing_pruned_gives_the_same_logits(big_run, tmp_path):
    out, record = inherit(big_run.training.save_dir, copy.deepcopy(big_run), tmp_path / "same")
    big = CheckpointReader(big_run.training.save_dir)
    same = CheckpointReader(out)
    assert record["inherit"]["layers"] == [0, 1, 2]
    batch = calibration_batches(big_run, big.tokenizer, 1)[0]
    with torch.no_grad():
        assert torch.equal(big.load_model()(batch), same.load_model()(batch))


def test_kept_entries_are_the_sources_and_the_small_model_starts_lower(big_run, tmp_path, cfg_factory):
    small_cfg = _small_cfg(big_run, tmp_path)
    out, record = inherit(big_run.training.save_dir, small_cfg, tmp_path / "small", width="l1", layers="even")
    r = record["inherit"]
    assert r["layers"] == [0, 2] and r["hidden"] == 32 and r["channels"] == [40, 40]
    big_reader, small_reader = CheckpointReader(big_run.training.save_dir), CheckpointReader(out)
    big_model, small_model = big_reader.load_model(), small_reader.load_model()
    bw, sw = dict(big_model.named_parameters()), dict(small_model.named_parameters())
    # recompute the selection independently from the L1 scores
    scores = {n: p.detach().abs() for n, p in bw.items()}
    hidden, groups, channels = width_scores(scores, big_run.model)
    h = top(hidden, 32)
    assert torch.equal(sw["embedding.weight"], bw["embedding.weight"][:, h])
    assert torch.equal(sw["output.head.linear.weight"], bw["output.head.linear.weight"][:, h])
    assert torch.equal(sw["output.norm.weight"], bw["output.norm.weight"][h])
    g = top(groups[2], 1)  # small block 1 is big block 2; one KV group of (2 query + k + v) x 16 rows
    rows = torch.cat([torch.arange(k * 64, (k + 1) * 64) for k in g.tolist()])
    assert torch.equal(sw["blocks.1.attention.qkv.weight"], bw["blocks.2.attention.qkv.weight"][rows][:, h])
    cols = torch.cat([torch.arange(k * 32, (k + 1) * 32) for k in g.tolist()])
    assert torch.equal(sw["blocks.1.attention.dense.weight"], bw["blocks.2.attention.dense.weight"][h][:, cols])
    c = top(channels[2], 40)
    assert torch.equal(sw["blocks.1.mlp.gate_up.weight"], bw["blocks.2.mlp.gate_up.weight"][torch.cat([c, 96 + c])][:, h])
    assert torch.equal(sw["blocks.1.mlp.down.weight"], bw["blocks.2.mlp.down.weight"][h][:, c])
    assert torch.equal(sw["blocks.0.input_norm.weight"], bw["blocks.0.input_norm.weight"][h])
    # group score by hand: |qkv rows| + |dense columns| of group 0 in block 0
    by_hand = bw["blocks.0.attention.qkv.weight"][:64].abs().sum() + bw["blocks.0.attention.dense.weight"][:, :32].abs().sum()
    assert groups[0][0] == pytest.approx(float(by_hand), rel=1e-5)

    # an inherited model starts clearly below a random one of the same shape, on the same batches
    from megatron_tfree.model import GPTModel
    from megatron_tfree.parallel import state

    batches = calibration_batches(small_cfg, small_reader.tokenizer, 4)
    with state.single_process():
        random_model = GPTModel(small_cfg.model, "tfree", small_reader.tokenizer.vocab_size, seed=1).eval()
    with torch.no_grad():
        inherited = sum(float(small_model.loss(b)) for b in batches) / 4
        rand = sum(float(random_model.loss(b)) for b in batches) / 4
    assert inherited < 0.8 * rand, (inherited, rand)

    # and it trains with training.init_from
    from distributed import train_rank

    ft = cfg_factory(tmp_path, "ft", model=SMALL, training={"init_from": str(out), "train_iterations": 1,
                                                             "eval_iterations": 0})
    train_rank(0, 1, ft)
    assert CheckpointReader(ft.training.save_dir).cfg.model.hidden_size == 32


def test_taylor_and_measured_layer_importance(big_run, tmp_path):
    reader = CheckpointReader(big_run.training.save_dir)
    model = reader.load_model()
    batches = calibration_batches(big_run, reader.tokenizer, 2)
    loss_up = layer_importance(model, batches)
    assert len(loss_up) == 3 and all(x == x for x in loss_up)
    assert len(list(model.blocks)) == 3 and all(type(b).__name__ == "TransformerBlock" for b in model.blocks)
    taylor = entry_scores(model, "taylor", batches)
    assert all(p.grad is None for p in model.parameters())  # gradients cleared
    w = dict(model.named_parameters())["blocks.0.mlp.down.weight"]
    assert taylor["blocks.0.mlp.down.weight"].shape == w.shape and taylor["blocks.0.mlp.down.weight"].sum() > 0
    out, record = inherit(big_run.training.save_dir, _small_cfg(big_run, tmp_path), tmp_path / "t",
                          width="taylor", layers="importance", calibration=2)
    r = record["inherit"]
    assert r["calibration_batches"] == 2 and len(r["layer_loss_increase"]) == 3
    assert r["layers"] == sorted(top(torch.tensor(r["layer_loss_increase"]), 2).tolist())


def test_a_small_model_that_does_not_fit_is_refused(big_run, tmp_path):
    with pytest.raises(ValueError, match="model.num_layers is 5, more than the source's 3"):
        check_shapes(big_run, _small_cfg(big_run, tmp_path, num_layers=5))
    with pytest.raises(ValueError, match=r"head size .* is 8, the source's is 16: choose model.num_attention_heads = 2"):
        check_shapes(big_run, _small_cfg(big_run, tmp_path, num_attention_heads=4, num_kv_heads=2))
    with pytest.raises(ValueError, match="query heads per KV head"):
        check_shapes(big_run, _small_cfg(big_run, tmp_path, num_kv_heads=2))
    assert Dims.of(big_run.model).group == 2


def test_the_command_line(big_run, tmp_path, capsys):
    src = big_run.training.save_dir
    assert main(["--from", src, "model.num_layers=2", "--out", str(tmp_path / "cli")]) == 0
    assert "2 blocks [0, 2] of the source, hidden 64" in capsys.readouterr().out
    assert CheckpointReader(tmp_path / "cli").cfg.model.num_layers == 2
    assert main(["--from", src, "model.num_layers=9", "--out", str(tmp_path / "bad")]) == 2
    assert "more than the source's 3" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
