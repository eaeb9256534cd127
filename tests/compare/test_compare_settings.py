"""The compare YAML: the compare: section is stripped before the arms' configs, overrides reach every arm,
the settings are validated by key, the arms' own fields are set; the planner rows."""

from __future__ import annotations

import pytest

from compare_helpers import REPO, toy_config


def test_arms_from_the_yaml(tmp_path):
    from megatron_tfree.compare import arms, settings

    cc = settings.load(toy_config(tmp_path / "c.yaml"), ["training.train_iterations=4", "model.hidden_size=64",
                                                          "compare.threads=2", "compare.eval.passages=7"])
    assert "compare" not in cc.base and cc.settings.threads == 2 and cc.settings.eval.passages == 7
    drafted = arms.draft_arms(cc)
    assert [(a.name, a.kind, a.role, a.nominal_vocab) for a in drafted] == [
        ("tf", "tfree", "reference", 512), ("bpe-s", "classic", "", 300), ("bpe-l", "classic", "baseline", 600)]
    for a in drafted:  # the overrides apply to every arm
        assert a.cfg.training.train_iterations == 4 and a.cfg.model.hidden_size == 64
    final = arms.finalise(drafted[1], tmp_path / "runs", "T", "V", tokenizer_file="bpe.json", seq_len=37)
    assert final.cfg.training.save_dir == str(tmp_path / "runs" / "bpe-s") and final.cfg.data.seq_len == 37
    assert final.cfg.data.prefix_paths == ["T"] and final.cfg.data.valid_prefix_paths == ["V"]
    assert final.cfg.tokenizer.tokenizer_file == "bpe.json" and final.run_dir == tmp_path / "runs" / "bpe-s"
    assert arms.fingerprint(final.cfg) != arms.fingerprint(drafted[1].cfg)
    diff = arms.config_differences(drafted[1].cfg.to_dict(), final.cfg.to_dict())
    assert "data.seq_len: 32 -> 37" in diff


def test_equalised_sequence_length():
    from megatron_tfree.compare.arms import equalised_seq_len

    assert equalised_seq_len(128, 3.72, 3.61) == 132 and equalised_seq_len(128, 3.72, 4.13) == 115
    assert equalised_seq_len(128, 3.72, 3.72) == 128
    with pytest.raises(ValueError):
        equalised_seq_len(128, 0.0, 3.0)


@pytest.mark.parametrize("override, message", [
    ("compare.nonsense=1", "unknown key compare.nonsense"),
    ("compare.eval.passage_bytes=0", "compare.eval.passage_bytes must be > 0"),
    ("compare.thresholds.quality_tolerance=2", "compare.thresholds.quality_tolerance must be in [0, 1)"),
    ("compare.baseline=nope", "no arm named 'nope'"),
    ("compare.reference=bpe-s", "must be a T-Free arm"),
    ("model.hidden_size=30", "arm tf:"),
])
def test_errors_name_the_key(tmp_path, override, message):
    from megatron_tfree.compare import arms, settings
    from megatron_tfree.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        arms.draft_arms(settings.load(toy_config(tmp_path / "c.yaml"), [override]))


def test_arm_list_errors(tmp_path):
    from megatron_tfree.compare import arms, settings
    from megatron_tfree.config import ConfigError

    same = [{"name": "a", "tokenizer": {"kind": "tfree"}}, {"name": "a", "tokenizer": {"kind": "classic"}}]
    with pytest.raises(ConfigError, match="unique"):
        settings.load(toy_config(tmp_path / "c.yaml", arms=same))
    only_tfree = [{"name": "a", "tokenizer": {"kind": "tfree"}}]
    with pytest.raises(ConfigError, match="at least one T-Free arm and one classic"):
        arms.draft_arms(settings.load(toy_config(tmp_path / "d.yaml", arms=only_tfree)))


def test_planner_rows_are_the_planners():
    from megatron_tfree.compare.planner import predicted_memory
    from megatron_tfree.compare.settings import PlannerSettings
    from megatron_tfree.config import load_config
    from megatron_tfree.plan import GIB, make_plan

    s = PlannerSettings(config=str(REPO / "configs" / "1b.yaml"))
    rows = predicted_memory(s, bytes_ratio=0.9)
    cfg = load_config(s.config)
    assert rows[0]["gib_per_gpu"] == make_plan(cfg, 8, 8, 80.0)["total_bytes"] / GIB
    assert rows[0]["vocab_size"] == 8192 and rows[1]["vocab_size"] == 65536
    assert rows[2]["seq_len"] == round(0.9 * cfg.data.seq_len)
    assert rows[0]["params_embedding_head"] == 2 * 8192 * cfg.model.hidden_size
    assert rows[0]["gib_per_gpu"] < rows[2]["gib_per_gpu"] < rows[1]["gib_per_gpu"]
