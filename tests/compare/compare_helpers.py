"""Shared pieces of the comparison tests (a uniquely named module: tests use pytest's prepend import mode)."""

from __future__ import annotations

import random
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SENTENCES = ["The king rides to the castle at night.", "A lady sings of the sea and the storm.",
             "My lord speaks of love and death.", "The ghost walks in the cold rain.",
             "Our ship sails over the dark water."]
STEPS = 40


def toy_docs(seed: int, n: int, sentences_per_doc: int) -> list[str]:
    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(SENTENCES) for _ in range(3)) for _ in range(sentences_per_doc // 3))
            for _ in range(n)]


def toy_config(path: Path, **compare) -> Path:
    """A compare YAML of three tiny arms (T-Free v=512 m=4, BPE 300 and 600 asked) written to ``path``."""
    section = {
        "arms": [{"name": "tf", "tokenizer": {"kind": "tfree", "vocab_size": 512, "vocab_population": 4}},
                 {"name": "bpe-s", "tokenizer": {"kind": "classic", "classic_vocab_size": 300}},
                 {"name": "bpe-l", "tokenizer": {"kind": "classic", "classic_vocab_size": 600}}],
        "threads": 1, "isolate": False, "collision_words": 50,
        "eval": {"passages": 4, "passage_bytes": 240, "prompts": ["The king"], "generation_words": 6,
                 "lm_eval_tasks": ["hamlet_ppl", "hamlet_cloze"], "lm_eval_include": str(REPO / "examples" / "lm_eval"),
                 "lm_eval_limit": 2},
        "planner": {"config": str(REPO / "configs" / "1b.yaml")},
    }
    section.update(compare)
    data = {"compare": section,
            "model": {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "init": "normal",
                      "loss_pos_weight": 10.0, "attention": "sdpa"},
            "tokenizer": {"kind": "tfree", "vocab_size": 512, "vocab_population": 4},
            "data": {"seq_len": 32, "aligned_max_bytes": 2000},
            "training": {"train_iterations": STEPS, "micro_batch_size": 8, "lr": 5e-3, "min_lr": 5e-4, "warmup_steps": 4,
                         "save_interval": 100, "log_interval": 10, "eval_interval": 10, "eval_iterations": 2,
                         "tensorboard": False}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
