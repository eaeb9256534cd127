"""Config loading: YAML + overrides, and errors that name the offending key."""

import pytest
import yaml

from megatron_tfree.config import Config, ConfigError, load_config


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_load_and_shipped_configs_validate():
    cfg = load_config()
    assert cfg.tokenizer.kind == "tfree" and cfg.tokenizer.initialize == "hash"
    tiny = load_config("configs/tiny.yaml")
    assert tiny.tokenizer.vocab_size == 8192 and tiny.data.prefix_paths == []
    big = load_config("configs/7b_fineweb.yaml")
    assert (big.model.hidden_size, big.model.num_layers, big.model.num_attention_heads) == (4096, 32, 32)
    assert (big.tokenizer.vocab_size, big.tokenizer.vocab_population,
            big.tokenizer.vocab_population_partial_lowercase) == (32000, 10, 2)
    assert big.training.global_batch_size == 1024 and big.training.precision == "bf16"
    assert (big.training.lr, big.training.min_lr, big.training.warmup_steps) == (3e-4, 3e-5, 1000)
    assert big.model.mlp_factor == 2.66796875 and big.data.seq_len == 4096


def test_overrides_are_typed_and_applied(tmp_path):
    p = write(tmp_path, {"model": {"hidden_size": 64, "num_attention_heads": 4}})
    cfg = load_config(p, ["training.lr=3e-4", "model.num_layers=2", "training.tensorboard=false",
                          "data.prefix_paths=[a, b]", "tokenizer.end_of_text=<|eot|>"])
    assert cfg.training.lr == 3e-4 and isinstance(cfg.training.lr, float)
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 64
    assert cfg.training.tensorboard is False
    assert cfg.data.prefix_paths == ["a", "b"]
    assert cfg.tokenizer.end_of_text == "<|eot|>"
    # an int given for a float field is accepted and converted
    assert load_config(None, ["training.lr=1"]).training.lr == 1.0


@pytest.mark.parametrize(
    "data, overrides, match",
    [
        ({"model": {"hiden_size": 3}}, [], r"unknown key model\.hiden_size"),
        ({"modle": {}}, [], r"unknown key modle"),
        ({}, ["training.train_iterations=ten"], r"training\.train_iterations must be an integer"),
        ({}, ["training.lr=fast"], r"training\.lr must be a number"),
        ({}, ["training.tensorboard=1"], r"training\.tensorboard must be true or false"),
        ({}, ["tokenizer.kind=bpe"], r"tokenizer\.kind must be one of"),
        ({"tokenizer": {"vocab_size": 8, "vocab_population": 10}}, [], r"tokenizer\.vocab_population \(10\) must be <= tokenizer\.vocab_size"),
        ({}, ["tokenizer.vocab_population_partial_lowercase=11"], r"tokenizer\.vocab_population_partial_lowercase"),
        ({}, ["model.hidden_size=100", "model.num_attention_heads=3"], r"model\.hidden_size \(100\) must be divisible"),
        ({}, ["model.num_kv_heads=3"], r"model\.num_kv_heads"),
        ({}, ["parallel.pipe=2", "parallel.zero_stage=2"], r"parallel\.zero_stage"),
        ({}, ["parallel.tensor=3"], r"parallel\.tensor"),
        ({}, ["parallel.sequence_parallel=true"], r"parallel\.sequence_parallel is not supported yet"),
        ({}, ["training.min_lr=1.0"], r"training\.min_lr"),
        ({}, ["training.global_batch_size=12"], r"training\.global_batch_size"),
        ({}, ["model.dropout=1.5"], r"model\.dropout"),
        ({}, ["data.finetuning=true"], r"data\.finetuning needs data\.prefix_paths"),
        ({"model": 3}, [], r"model must be a mapping"),
    ],
)
def test_bad_values_name_the_key(tmp_path, data, overrides, match):
    p = write(tmp_path, data)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p, overrides)
    if data:  # errors from the file name the file
        assert str(p) in str(e.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["training.lr"])
    with pytest.raises(ConfigError, match="key must be section.key"):
        load_config(None, ["lr=3"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["training.seed=7"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and isinstance(again, Config)
    assert not (tmp_path / "config.yaml.tmp").exists()


def test_string_overrides_keep_their_text():
    cfg = load_config(None, ["training.sample_prompt=ROMEO:", "training.save_dir=runs/a: b", "tokenizer.tokenizer_file=1e3"])
    assert cfg.training.sample_prompt == "ROMEO:"
    assert cfg.training.save_dir == "runs/a: b"
    assert cfg.tokenizer.tokenizer_file == "1e3"
    with pytest.raises(ConfigError, match="training.lr must be a number"):
        load_config(None, ["training.lr=ROMEO:"])


@pytest.mark.parametrize("override,match", [
    ("model.mlp_factor=.inf", "model.mlp_factor must be a finite number, got inf"),
    ("model.init_std=nan", "model.init_std must be a finite number, got nan"),
    ("model.loss_pos_weight=.inf", "model.loss_pos_weight must be a finite number"),
    ("training.lr=.nan", "training.lr must be a finite number"),
    ("model.hidden_size=1e9", "model.hidden_size = 1000000000 is beyond any model"),
    ("model.mlp_factor=1e6", "model.mlp_factor = 1000000.0 is beyond"),
    ("training.collective_timeout=0", "training.collective_timeout must be > 0"),
])
def test_numbers_are_finite_and_in_range_before_anything_is_allocated(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_a_model_too_big_for_the_machine_is_refused_before_allocating():
    from megatron_tfree.training.engine import check_model_fits

    cfg = load_config(None, ["model.hidden_size=65536", "model.num_layers=64", "model.num_attention_heads=64"])
    with pytest.raises(ConfigError, match=r"fp32 weights alone need [0-9.]+ GiB per rank .* this machine has"):
        check_model_fits(cfg, 8192)
    check_model_fits(load_config(None, []), 8192)  # the default tiny model fits
