"""End to end: train through the DeepSpeed trainer on a tiny corpus of one memorised sentence, load
the checkpoint with InferencePipe.from_checkpoint and check greedy generation echoes the sentence."""

import pytest

from megatron_tfree.config import Config
from megatron_tfree.data.convert import align_memory_map, convert_text_files
from megatron_tfree.inference import InferencePipe
from megatron_tfree.training import train

SENTENCE = "Hello World! The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def echo_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("echo")
    src = d / "txt"
    src.mkdir()
    for i in range(40):  # one sentence per document: <|endoftext|> then the sentence again
        (src / f"doc{i:02d}.txt").write_text(SENTENCE)
    convert_text_files([src], d / "train", progress=False)
    align_memory_map(d / "train", max_bytes=2000, progress=False)
    return str(d / "train")


@pytest.mark.parametrize("kind", ["tfree", "classic"])
def test_trainer_memorises_and_generation_echoes(echo_corpus, tmp_path, kind):
    tokenizer = {"kind": kind, "vocab_size": 1024, "vocab_population": 4}
    if kind == "classic":
        tokenizer.update(tokenizer_file=str(tmp_path / "bpe.json"), classic_vocab_size=300)
    cfg = Config.from_dict({
        "model": {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "loss_pos_weight": 10.0},
        "tokenizer": tokenizer,
        "data": {"prefix_paths": [echo_corpus], "valid_prefix_paths": [echo_corpus], "seq_len": 24},
        "training": {"train_iterations": 60, "micro_batch_size": 4, "lr": 5e-3, "min_lr": 5e-4,
                     "warmup_steps": 5, "save_dir": str(tmp_path / "run"), "save_interval": 1000,
                     "log_interval": 1000, "eval_interval": 60, "eval_iterations": 1, "tensorboard": False},
    }, source="<test>")
    result = train(cfg)
    losses = [v for v in result.losses.values() if v is not None]
    assert losses[-1] < 0.2 * losses[0]  # the trainer drives the loss down
    assert result.last_eval["bits_per_byte"] < 0.5  # a memorised text costs (almost) nothing

    pipe = InferencePipe.from_checkpoint(tmp_path / "run")
    out = pipe.generate("Hello", max_words=14)
    assert out.startswith(SENTENCE[len("Hello"):]), out
