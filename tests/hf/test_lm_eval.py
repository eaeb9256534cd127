"""lm-evaluation-harness, offline, on tiny tasks defined here (task YAML + local JSONL: one multiple-choice
task, one rolling perplexity task, both built from the training text's sentences): the ``tfree`` model on
native checkpoints and on their HF exports (same numbers), lm-eval's own ``hf`` model on classic exports;
a briefly trained model beats an untrained one on both tasks, for both kinds."""

from __future__ import annotations

import json
import random

import pytest

from corpus_text import memory_map

SENTENCES = ["The king rides to the castle at night.", "A lady sings of the sea and the storm.",
             "My lord speaks of love and death.", "The ghost walks in the cold rain.",
             "Our ship sails over the dark water."]
STEPS = 60


def _docs(seed, n, sentences_per_doc):
    rng = random.Random(seed)
    return [" ".join(rng.choice(SENTENCES) for _ in range(sentences_per_doc)) for _ in range(n)]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """include_path with tiny_mc (next word: a corpus word vs an unseen one) and tiny_ppl (held-out text)."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    rng = random.Random(7)
    mc = []
    for sentence in SENTENCES:  # every cut of every sentence: the true next word vs another sentence's word
        words = sentence.rstrip(".").split()
        for k in range(2, len(words)):
            other = rng.choice([w for s in SENTENCES if s != sentence for w in s.rstrip(".").split()[1:]
                                if w not in words])
            choices = [words[k], other]  # lm-eval puts its target_delimiter " " before a choice
            answer = rng.randint(0, 1)
            if answer:
                choices.reverse()
            mc.append({"context": " ".join(words[:k]), "choices": choices, "answer": answer})
    ppl = [{"text": t} for t in _docs(11, 4, 6)]
    for name, rows in (("mc", mc), ("ppl", ppl)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: answer
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
""")
    (d / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'ppl.jsonl'}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""")
    return d


@pytest.fixture(scope="module")
def runs(cfg_factory, tmp_path_factory):
    """{(kind, trained): run dir}: 60 steps at lr 5e-3, or one step at lr 1e-9 (untrained)."""
    from megatron_tfree.training.loop import train

    out = tmp_path_factory.mktemp("lm_eval_runs")
    corpus = {"prefix_paths": [memory_map(out, "train", _docs(1, 40, 12))], "seq_len": 32,
              "valid_prefix_paths": [memory_map(out, "valid", _docs(2, 2, 12))]}
    made = {}
    for kind in ("tfree", "classic"):
        tokenizer = {"kind": kind}
        if kind == "classic":
            tokenizer.update(tokenizer_file=str(out / "bpe.json"), classic_vocab_size=400)
        for trained in (True, False):
            training = {"train_iterations": STEPS, "lr": 5e-3, "min_lr": 5e-4, "warmup_steps": 5} if trained else \
                {"train_iterations": 1, "lr": 1e-9, "min_lr": 0.0}
            training.update(micro_batch_size=8, eval_iterations=0, save_interval=1000)
            cfg = cfg_factory(out, f"{kind}-{trained}", model={"hidden_size": 32, "num_layers": 2, "loss_pos_weight": 10.0,
                                                              "num_attention_heads": 4, "attention": "sdpa"},
                              tokenizer=tokenizer, training=training, data=corpus)
            train(cfg)
            made[kind, trained] = cfg.training.save_dir
    return made


@pytest.fixture(scope="module")
def task_manager(tasks):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks), include_defaults=False)  # indexing lm-eval's own tasks: ~30 s


def _evaluate(model, task_manager):
    import lm_eval

    results = lm_eval.simple_evaluate(model=model, tasks=["tiny_mc", "tiny_ppl"], task_manager=task_manager,
                                      bootstrap_iters=0, log_samples=False, random_seed=0)["results"]
    return results["tiny_mc"]["acc,none"], results["tiny_ppl"]["bits_per_byte,none"]


def test_tfree_trained_beats_untrained_native_and_export_agree(runs, task_manager, tmp_path):
    from megatron_tfree.hf.export import export
    from megatron_tfree.hf.lm_eval_model import TFreeLM

    trained = _evaluate(TFreeLM(runs["tfree", True]), task_manager)
    untrained = _evaluate(TFreeLM(runs["tfree", False]), task_manager)
    print(f"\nT-Free acc / bits per byte: trained {trained}, untrained {untrained}")
    assert trained[0] > untrained[0] + 0.2 and trained[1] < untrained[1]
    exported = _evaluate(TFreeLM(str(export(runs["tfree", True], tmp_path / "hf"))), task_manager)
    assert exported[0] == trained[0] and exported[1] == pytest.approx(trained[1], rel=1e-4)


def test_classic_export_with_lm_evals_hf_model(runs, task_manager, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from megatron_tfree.hf.export import export

    scores = {}
    for trained in (True, False):
        path = export(runs["classic", trained], tmp_path / f"hf-{trained}")
        scores[trained] = _evaluate(HFLM(pretrained=str(path), device="cpu", batch_size=4), task_manager)
    print(f"\nclassic acc / bits per byte: trained {scores[True]}, untrained {scores[False]}")
    assert scores[True][0] > scores[False][0] + 0.2 and scores[True][1] < scores[False][1]


def test_tfree_requests_directly(runs):
    from lm_eval.api.instance import Instance

    from megatron_tfree.hf.lm_eval_model import TFreeLM

    lm = TFreeLM(runs["tfree", True], max_length=8)
    req = lambda kind, args: Instance(request_type=kind, doc={}, arguments=args, idx=0)  # noqa: E731
    (right, greedy), (wrong, _), (empty, g2) = lm.loglikelihood([
        req("loglikelihood", ("The king", " rides to the castle")), req("loglikelihood", ("The king", " sings of the sea")),
        req("loglikelihood", ("The king", ""))])
    assert wrong < right < 0 and isinstance(greedy, bool) and (empty, g2) == (0.0, True)
    text = " ".join(SENTENCES)  # 33 words: windows of at most 8
    # a continuation longer than max_length (it used to fail) is scored in chunks of 8 words, each after the 8
    # words before it: the sum of scoring each chunk alone after everything before it
    ((whole, _),) = lm.loglikelihood([req("loglikelihood", ("The king", " " + text))])
    context, targets = lm.units("The king"), lm.units("The king " + text)[len(lm.units("The king")):]
    extra = list(dict.fromkeys(context + targets))
    assert len(targets) > 24 and whole < 0
    assert lm._score(context, targets, extra)[0] == pytest.approx(whole, rel=1e-6)
    chunks = [lm._score(context + targets[:k], targets[k:k + 8], extra)[0] for k in range(0, len(targets), 8)]
    assert whole == pytest.approx(sum(chunks), rel=1e-5)
    rolling = lm.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])[0]
    assert rolling < 0
    long_context = TFreeLM(runs["tfree", True], max_length=64)
    assert long_context.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])[0] != rolling
    (gen,) = lm.generate_until([req("generate_until", ("The king", {"until": ["."], "max_gen_toks": 12}))])
    full = lm.backend.generate(["The king"], 12, 0.0, None)[0]  # greedy: the same words, not cut
    assert "." not in gen and full.startswith(gen) and (full == gen or full[len(gen):].startswith("."))


def test_registered_and_the_cli_runs(runs, tasks, capsys):
    from lm_eval.api.registry import get_model

    from megatron_tfree import eval as eval_cli
    from megatron_tfree.hf.lm_eval_model import TFreeLM

    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["run", "--help"])
    assert exit_info.value.code == 0 and "--model" in capsys.readouterr().out
    assert get_model("tfree") is TFreeLM and get_model("hf").__name__ == "HFLM"  # ours beside lm-eval's own
