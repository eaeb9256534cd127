"""The README model card every export carries: what the model is, how it was trained, how to use it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointReader
from ..checkpoint.files import STATE_FILE, TrainerState


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M" if n >= 1e5 else f"{n:,}"


def parameter_counts(reader: CheckpointReader) -> dict[str, int]:
    """Parameters by part: embedding + head vs the rest (transformer blocks and norms)."""
    emb_head = sum(s.numel for n, s in reader.specs.items() if n in ("embedding.weight", "output.head.linear.weight"))
    total = sum(s.numel for s in reader.specs.values())
    return {"embedding_and_head": emb_head, "rest": total - emb_head, "total": total}


def _training(reader: CheckpointReader) -> str:
    cfg = reader.cfg
    t, d = cfg.training, cfg.data
    data = ", ".join(d.prefix_paths) if d.prefix_paths else "the built-in default corpus (Shakespeare's works)"
    if (reader.tag_dir / STATE_FILE).is_file():
        state = TrainerState.read(reader.tag_dir)
        steps = f"{state.step} optimizer steps, {state.consumed_samples:,} sequences of {d.seq_len} units"
    else:
        steps = "not recorded (an imported checkpoint)"
    return (f"- steps: {steps}\n- data: {data}{' (instruction fine-tuning)' if d.finetuning else ''}\n"
            f"- precision {t.precision}, lr {t.lr:g} ({t.lr_decay_style}, warmup {t.warmup_steps}), "
            f"micro batch {t.micro_batch_size}, layout TP={cfg.parallel.tensor} PP={cfg.parallel.pipe} "
            f"ZeRO-{cfg.parallel.zero_stage}\n- source checkpoint: `{reader.tag_dir}` ({reader.describe()})")


def write_model_card(directory: Path, reader: CheckpointReader, target: Any, dtype: str, nbytes: int,
                     shards: int, out: str) -> Path:
    m = reader.cfg.model
    card = target.card()
    card["usage"] = card["usage"].replace("```python\n", f"```python\npath = {out!r}  # this folder\n", 1)
    counts = parameter_counts(reader)
    text = f"""---
library_name: transformers
tags: [megatron_tfree, {reader.kind}]
---
# {reader.tag_dir.parent.name}/{reader.tag_dir.name} ({'T-Free' if reader.kind == 'tfree' else 'classic BPE'})

Exported by megatron_tfree (`tools/convert2hf.py`).

## Architecture
{card['architecture']}.

- {m.num_layers} layers, hidden size {m.hidden_size}, {m.num_attention_heads} attention heads
  ({m.num_kv_heads or m.num_attention_heads} KV heads), SwiGLU, RMSNorm (eps {m.norm_eps:g}), rotary base
  {m.rotary_embedding_base:g}, {'biases' if m.bias else 'no biases'}, untied head
- parameters: {_millions(counts['total'])} in total: embedding + head {_millions(counts['embedding_and_head'])},
  the rest {_millions(counts['rest'])}
- weights: {dtype}, {nbytes / 1e6:,.1f} MB in {shards} safetensors file(s)

## Tokenizer
{card['tokenizer']}.

## Training
{_training(reader)}

The resolved training config is `training_config.yaml`.

## Usage
{card['usage']}

{card['notes']}
"""
    path = directory / "README.md"
    path.write_text(text)
    return path
