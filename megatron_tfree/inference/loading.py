"""Reading a training checkpoint for inference: config, tokenizer, weights, word counts, dictionary.

A checkpoint is a DeepSpeed tag directory ``save_dir/step_N/`` (``save_dir/latest`` names the newest)
holding, beside DeepSpeed's files, ``config.yaml``, the tokenizer (in ``tokenizer/``, or directly in
the tag directory), ``word_counts.json`` and, once ``tools/generate_tokenizer.py`` ran, the decode
dictionary ``decode_dictionary.safetensors`` + ``decode_dictionary.json``.

A consolidated directory (``tools/convert_checkpoint.py``: any layout -> full fp32 tensors) is read
like a tag directory. A tensor- or pipeline-parallel DeepSpeed checkpoint is refused with an error
telling the user to convert it (converting needs the source layout's processes, not cheap).

Weights, first found wins: ``model.safetensors`` (a consolidated export, e.g. of a ZeRO-3 run), then
DeepSpeed's ``mp_rank_00_model_states.pt`` (state dict under ``"module"``). Every ``torch.load`` uses
``weights_only=True``; nothing here unpickles arbitrary objects. A ZeRO-3 checkpoint stores its
parameters partitioned in the optimizer shards; consolidate it first (DeepSpeed's ``zero_to_fp32.py``,
then save the result as ``model.safetensors`` in the tag directory) - the error says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..config import Config, load_config
from ..tokenizer import Tokenizer, load_tokenizer
from ..tokenizer.dictionary import DecodeDictionary, read_word_counts

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
WORD_COUNTS_FILE = "word_counts.json"
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
SAFETENSORS_FILE = "model.safetensors"
DICTIONARY_NAME = "decode_dictionary"  # .safetensors + .json


def resolve_checkpoint(path: str | Path) -> Path:
    """The tag directory of ``path``: ``path/<tag in latest>`` for a save dir, else ``path`` itself."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    latest = path / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text().strip()
        if not tag:
            raise ValueError(f"{latest} is empty")
        tag_dir = path / tag
        if not tag_dir.is_dir():
            raise FileNotFoundError(f"{latest} names {tag!r} but {tag_dir} does not exist")
        return tag_dir
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is neither a save dir (no '{LATEST_FILE}' file) nor a checkpoint tag "
                                f"directory (no {CONFIG_FILE})")
    return path


def load_checkpoint_config(tag_dir: Path) -> Config:
    return load_config(tag_dir / CONFIG_FILE)


def load_checkpoint_tokenizer(tag_dir: Path) -> Tokenizer:
    sub = tag_dir / TOKENIZER_DIR
    return load_tokenizer(sub if sub.is_dir() else tag_dir)


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` / ``_orig_mod.`` wrapper prefix shared by every key."""
    out = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def _deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoint files pickle (shared with the training checkpoint loader)."""
    try:
        from ..training.checkpoint import _deepspeed_safe_globals as classes
    except ImportError:  # no DeepSpeed installed: nothing extra to allow
        return []
    try:
        return classes()
    except ImportError:
        return []


class _WeightsOnlyTorch:
    """``torch`` as seen by DeepSpeed's zero_to_fp32 module, except that ``load`` is always
    ``weights_only=True`` (with DeepSpeed's few checkpoint classes allowed)."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(f, map_location=map_location, **kwargs)


def consolidate_zero_checkpoint(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of a ZeRO (stage 1-3) tag directory, via DeepSpeed's zero_to_fp32 reader
    with every ``torch.load`` forced to ``weights_only=True``. Save it as ``model.safetensors`` in the
    tag directory to skip this next time."""
    try:
        from deepspeed.utils import zero_to_fp32
    except ImportError:
        raise ValueError(f"{tag_dir}: a ZeRO checkpoint needs DeepSpeed to consolidate (or a {SAFETENSORS_FILE})") from None
    real = zero_to_fp32.torch
    zero_to_fp32.torch = _WeightsOnlyTorch()
    try:
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except Exception as e:
        raise ValueError(f"{tag_dir}: could not consolidate the ZeRO checkpoint: {e}") from None
    finally:
        zero_to_fp32.torch = real
    return _strip_prefix({k: v.float() for k, v in state.items()})


def _check_single_layout(tag_dir: Path) -> None:
    """Refuse a tensor- or pipeline-parallel DeepSpeed checkpoint (its weights are split over files)."""
    split = sorted(p.name for p in tag_dir.glob("layer_*-model_states.pt"))[:1] + \
        sorted(p.name for p in tag_dir.glob("mp_rank_0[1-9]*_model_states.pt"))[:1]
    if split:
        raise ValueError(f"{tag_dir}: a tensor/pipeline-parallel DeepSpeed checkpoint (e.g. {split[0]}); inference "
                         f"reads layout-free checkpoints: run `python tools/convert_checkpoint.py {tag_dir} OUT_DIR` "
                         f"and load OUT_DIR")


def load_model_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The model's full state dict from a tag directory (see the module docstring)."""
    st = tag_dir / SAFETENSORS_FILE
    if st.is_file():  # also the fast path of a consolidated directory (tools/convert_checkpoint.py)
        from safetensors.torch import load_file

        return _strip_prefix(load_file(str(st)))
    _check_single_layout(tag_dir)
    pt = tag_dir / MODEL_STATES_FILE
    if not pt.is_file() and any(tag_dir.glob("zero_pp_rank_*_mp_rank_*_optim_states.pt")):
        return consolidate_zero_checkpoint(tag_dir)
    if not pt.is_file():
        raise FileNotFoundError(f"{tag_dir}: no model weights ({SAFETENSORS_FILE} or {MODEL_STATES_FILE})")
    try:
        data = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception:  # DeepSpeed pickles a few of its own classes: allow exactly those, still weights_only
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                data = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{pt}: cannot be read with torch.load(weights_only=True): {e}") from None
    if not isinstance(data, Mapping) or "module" not in data or not isinstance(data["module"], Mapping):
        raise ValueError(f"{pt}: expected a dict with the model state dict under key 'module'")
    state = _strip_prefix(data["module"])
    if not state or any(v.numel() == 0 for v in state.values() if isinstance(v, torch.Tensor)):
        raise ValueError(f"{pt}: the parameters are partitioned (ZeRO-3). Consolidate them first: run "
                         f"DeepSpeed's zero_to_fp32.py on {tag_dir.parent} (tag {tag_dir.name}) and save the state "
                         f"dict as {tag_dir / SAFETENSORS_FILE} (safetensors.torch.save_file)")
    return state


def load_model(tag_dir: Path, cfg: Config, tokenizer: Tokenizer, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A :class:`GPTModel` with the checkpoint's weights, in eval mode on ``device``."""
    from ..model import GPTModel

    model = GPTModel(cfg.model, cfg.tokenizer.kind, tokenizer.vocab_size, seed=0)
    state = load_model_state(tag_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{tag_dir}: weights do not fit the model of {tag_dir / CONFIG_FILE}: "
                         f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model.to(device).eval()


def load_word_counts(tag_dir: Path, extra: Optional[str | Path] = None, allow_pickle: bool = False) -> dict[str, int]:
    """Training word counts of the checkpoint (empty when absent) plus those of ``extra`` (summed)."""
    counts: dict[str, int] = {}
    path = tag_dir / WORD_COUNTS_FILE
    if path.is_file():
        counts = read_word_counts(path)
    if extra is not None:
        for w, c in read_word_counts(extra, allow_pickle=allow_pickle).items():
            counts[w] = counts.get(w, 0) + c
    return counts


def dictionary_path(tag_dir: Path) -> Path:
    """Where the precomputed decode dictionary of a tag directory lives (``.safetensors`` + ``.json``)."""
    return tag_dir / f"{DICTIONARY_NAME}.safetensors"


def has_dictionary(tag_dir: Path) -> bool:
    p = dictionary_path(tag_dir)
    return p.is_file() and p.with_suffix(".json").is_file()


def checkpoint_dictionary(tag_dir: Path, tokenizer: Tokenizer, word_counts: Optional[str | Path] = None,
                          allow_pickle: bool = False) -> Optional[DecodeDictionary]:
    """The decode dictionary of a checkpoint: the stored one (no recomputation) when present and no
    extra word counts are given, else built from the word counts. None for classic tokenizers."""
    if tokenizer.kind != "tfree":
        return None
    if word_counts is None and has_dictionary(tag_dir):
        logger.info("loading precomputed decode dictionary %s", dictionary_path(tag_dir))
        return DecodeDictionary.load(dictionary_path(tag_dir), tokenizer=tokenizer)
    counts = load_word_counts(tag_dir, word_counts, allow_pickle)
    logger.info("building the decode dictionary from %d words", len(counts))
    return DecodeDictionary.build(tokenizer, counts)


def precompute_dictionary(checkpoint: str | Path, word_counts: Optional[str | Path] = None,
                          reduce_to: Optional[int] = None, allow_pickle: bool = False) -> Path:
    """Build the decode dictionary of a checkpoint once and store it beside the weights; returns the
    ``.safetensors`` path. ``reduce_to`` keeps the special words plus the top-N words."""
    tag_dir = resolve_checkpoint(checkpoint)
    tokenizer = load_checkpoint_tokenizer(tag_dir)
    if tokenizer.kind != "tfree":
        raise ValueError(f"{tag_dir}: a {tokenizer.kind!r} tokenizer has no decode dictionary")
    counts = load_word_counts(tag_dir, word_counts, allow_pickle)
    d = DecodeDictionary.build(tokenizer, counts, progress=True)
    if reduce_to is not None:
        d = d.reduce_to(reduce_to)
    path, _ = d.save(dictionary_path(tag_dir))
    logger.info("stored %d dictionary words in %s", len(d), path)
    return path


__all__ = ["resolve_checkpoint", "load_checkpoint_config", "load_checkpoint_tokenizer", "load_model_state",
           "load_model", "load_word_counts", "dictionary_path", "checkpoint_dictionary", "precompute_dictionary"]
