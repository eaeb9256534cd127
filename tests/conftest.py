import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from megatron_tfree.config import Config  # noqa: E402 (after the environment defaults)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing: CUDA tests cannot run either
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------------------------------
# trainer fixtures: a tiny corpus (converted with the real data tools) and tiny configs. Nothing here
# downloads: the corpus is generated text written to tmp_path and converted to a MemoryMap + aligned
# index, passed as data.prefix_paths / data.valid_prefix_paths.
# --------------------------------------------------------------------------------------------------

from corpus_text import generated_docs as _text, memory_map as _memory_map  # noqa: E402


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """(train_prefix, valid_prefix, train_text_dir) of a small generated corpus."""
    d = tmp_path_factory.mktemp("corpus")
    train = _memory_map(d, "train", _text(1, 6, 1500))
    valid = _memory_map(d, "valid", _text(2, 1, 600))
    return train, valid, d / "train_txt"


def make_cfg(corpus, out_dir, name: str = "run", **sections) -> Config:
    """A tiny config (hidden 32, 2 layers, seq 16, micro 2, vocab 512) saving to ``out_dir/name``.
    ``sections`` update the sections, e.g. ``training={"zero_stage": 1}``."""
    data = {
        "model": {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 2, "init": "normal"},
        "tokenizer": {"kind": "tfree", "vocab_size": 512, "vocab_population": 4},
        "data": {"prefix_paths": [corpus[0]], "valid_prefix_paths": [corpus[1]],
                 "seq_len": 16, "aligned_max_bytes": 2000},
        "training": {"train_iterations": 6, "micro_batch_size": 2, "lr": 3e-3, "min_lr": 3e-4,
                     "warmup_steps": 2, "save_dir": str(out_dir / name), "save_interval": 100,
                     "log_interval": 1, "eval_interval": 100, "eval_iterations": 2,
                     "tensorboard": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Config.from_dict(data, source="<test>")


@pytest.fixture(scope="session")
def cfg_factory(tiny_corpus):
    """``make_cfg`` bound to the session corpus: ``cfg_factory(out_dir, name, **sections)``."""
    return lambda out_dir, name="run", **sections: make_cfg(tiny_corpus, out_dir, name, **sections)


@pytest.fixture
def tiny_cfg(tiny_corpus, tmp_path):
    """``make_cfg`` bound to the session corpus and this test's tmp_path."""
    return lambda name="run", **sections: make_cfg(tiny_corpus, tmp_path, name, **sections)


@pytest.fixture(scope="session", autouse=True)
def _destroy_process_group_at_exit():
    """The trainer initialises gloo once per test process; destroy it before exit (no SIGABRT)."""
    yield
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def extensions_dir(request, tmp_path_factory):
    """Where the kernels are JIT-built: the pytest cache (kept between sessions), or a session temp dir
    when the cache plugin is off (``-p no:cacheprovider``)."""
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("torch_extensions") if cache is not None else tmp_path_factory.mktemp("torch_extensions")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a busy 2-core machine: one torch thread is several times faster than two
    contending ones. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
