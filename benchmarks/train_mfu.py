"""GPU training throughput and MFU of a T-Free model vs the classic BPE model of the same transformer.

    python benchmarks/train_mfu.py [--config configs/1b.yaml] [--kinds tfree,classic] [--classic-vocab 65536]
        [--seq-len 4096] [--micro-batch auto|N] [--steps 30] [--warmup 5] [--checkpointing auto|on|off]
        [--peak-tflops auto|X] [--max-seconds S] [--json PATH]
    python benchmarks/train_mfu.py --config configs/tiny.yaml --seq-len 64 --steps 2 --dry-run   # CPU smoke test
    python benchmarks/train_mfu.py --device-info [--json PATH]    # the device record only (exit 2: no CUDA)

Both models are :class:`~megatron_tfree.model.GPTModel` built from ``--config``: the same blocks; they
differ in tokenizer kind, embedding, head and loss (T-Free: ``tokenizer.vocab_size`` v with the
embedding-bag input and the fused head + BCE; classic: ``--classic-vocab`` V, lookup + cross-entropy).
A plain PyTorch loop on one GPU (no DeepSpeed): **bf16 weights, activations and gradients with fp32
master weights and fp32 AdamW state** (what DeepSpeed's bf16 mode does and what the planner's memory
model assumes: 2 + 2 + 12 bytes per parameter; the fp32 gradient copy the optimizer reads is
transient), gradient clipping at ``training.gradient_clipping``, constant ``training.lr``. The ops
backend is ``cpp`` where it can be loaded (CUDA tensors then run the kernels of ``csrc/*_kernels.cu``,
prebuilt or JIT-built, see :mod:`megatron_tfree.ops.cuda`), else the PyTorch reference ops; the JSON
says which.

**Batches** are random but shaped like the trainer's (:func:`megatron_tfree.data.dataset.collate`):
per sequence ``S + 1`` words, each of ``k`` trigrams (``k`` uniform in ``1 .. 2t - 1``, mean
``t = --trigrams-per-word``, default the planner's 6) of ``m = tokenizer.vocab_population`` random ids
in ``[0, v)``; input row ``s`` holds word ``s``'s ids, target row ``s`` word ``s + 1``'s (multi-hot,
repeats clamp to 1); classic: one random id per position, target the next. One document per row,
positions ``0 .. S-1``, every loss weight 1. Two such batches are made per micro-batch size and
alternate.

**Micro batch** ``auto`` = the largest that fits: sizes ``--max-micro-batch, /2, .. 1``, starting one
power of two above the largest the planner (:func:`megatron_tfree.plan.make_plan`) predicts below
90% of the device memory; the first training step of a size is its trial: on
``torch.cuda.OutOfMemoryError`` the step is dropped, the cache emptied, and the next smaller size
tried. ``--checkpointing auto`` turns activation checkpointing on only if size 1 does not fit without
it. Then ``--warmup`` untimed and ``--steps`` timed steps (each step synchronised; ``--max-seconds``
stops the timed steps early, shared over the kinds, the JSON says how many ran).

**FLOPs** (training = forward + backward; 2 FLOPs per multiply-add; backward = 2 x forward), per
position (a T-Free word or a BPE token), with ``P_blocks`` the transformer blocks' parameters
(:func:`megatron_tfree.plan.param_counts`), ``L`` layers, width ``h``, sequence ``S``, head width
``v`` (T-Free ``v``, classic ``V``) and ``n`` input ids per position (T-Free: measured from the
batches, ~``m t``; classic 1)::

    6 P_blocks            linears of the blocks (norm weights counted as weights: < 0.1%)
  + 12 L h S              attention scores and values, full S (causal masking not discounted)
  + 6 h v                 the head (logits, their input and weight gradients)
  + 2 n h                 embedding bag: n h adds forward, n h scatter-adds into the weight gradient

The first three terms are :func:`megatron_tfree.sweep.flops_per_position` (the sweep's FLOPs per word;
the same function, not a copy); the embedding-bag term is added here (the sweep leaves it out). These
are *model* FLOPs: what MFU counts. Activation checkpointing re-runs every block's forward
(``2 P_blocks + 4 L h S`` more, the fused T-Free head may recompute its logits in backward): those
are in ``hardware_tflops`` only. ``achieved TFLOP/s = FLOPs/position x positions / step time``;
``MFU = achieved / peak``, peak the device's **dense bf16 tensor-core rate, no sparsity**
(:data:`PEAK_BF16_TFLOPS`; ``--peak-tflops X`` overrides; an unknown device gives MFU null and a note).

**Words per second**: T-Free positions per second / ``--tfree-units-per-word`` (default 1.0: a T-Free
position is one word) and BPE positions per second / ``--bpe-tokens-per-word`` (default 1.3, the usual
rule of thumb for English BPE; the same defaults as the sweep's). Both are assumptions; measure them
on your corpus and pass them. ``tokens_per_s`` = ``positions_per_s`` (positions of either model).

**JSON** (``--json PATH``; rewritten after each kind so a killed run keeps what it measured):
``device`` ({name, capability, total_memory_bytes, memory_gib, multiprocessors, device_count, torch,
cuda, cudnn, driver, peak_bf16_tflops, peak_label}), ``dry_run``, ``config``, ``seq_len``, ``steps``,
``warmup``, ``precision``, ``peak_tflops``, ``peak_source``, ``peak_note``, ``flops_formula``,
``assumptions`` ({tfree_units_per_word, bpe_tokens_per_word, trigrams_per_word}), ``kinds``
({kind: row}), ``tfree_vs_classic_words_per_s``, ``mfu`` (the T-Free row's), ``notes``. A row:
``kind``, ``vocab``, ``seq_len``, ``micro_batch``, ``checkpointing``, ``attention`` (flash / sdpa),
``ops_backend``, ``cuda_kernels``, ``params`` ({total, embedding, blocks, output, non_embedding,
measured}), ``ids_per_position``, ``steps_timed``, ``step_time_s`` (median), ``step_time_mean_s``,
``positions_per_s``, ``tokens_per_s``, ``words_per_s``, ``flops_per_position`` ({blocks, attention,
head, embedding, model, recompute, hardware}), ``model_tflops`` (achieved), ``hardware_tflops``,
``mfu``, ``peak_memory_bytes`` / ``peak_memory_gib`` (``torch.cuda.max_memory_allocated`` over the kept
size's steps; null on the CPU), ``planner_memory_bytes`` / ``planner_memory_gib`` (the planner's
prediction for this layout: 1 GPU, ZeRO 0, bf16, this micro batch, checkpointing and attention path),
``memory_vs_planner`` (measured / predicted), ``loss_first``, ``loss_last``, ``attempts``
([{micro_batch, checkpointing, result: ok|oom, planner_gib}]).

Without CUDA (and without ``--dry-run``) it prints one line starting ``no CUDA device:`` and exits 2.
``--dry-run`` runs the same code on the CPU (micro batch ``auto`` = 2: the CPU has no out-of-memory
signal to search with) so tests can exercise it; its throughput means nothing and its peak memory is null.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 1024**3
KINDS = ("tfree", "classic")
PEAK_NOTE = "dense bf16 tensor-core peak, no sparsity"
#: (label, dense bf16 TFLOP/s without sparsity); looked up by :func:`peak_tflops`
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 SXM": 989.4,
    "H200 SXM": 989.4,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.0,
}
FLOPS_FORMULA = ("per position: 6*P_blocks + 12*L*h*S + 6*h*v + 2*n*h (n = input ids per position); model FLOPs "
                 "(activation-checkpointing recompute 2*P_blocks + 4*L*h*S only in hardware_tflops)")
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------
# device, peak, FLOPs
# --------------------------------------------------------------------------------------------------


def peak_tflops(device_name: str) -> tuple[Optional[float], str]:
    """``(dense bf16 TFLOP/s, table label)`` for a ``torch.cuda.get_device_name()``; ``(None, reason)``
    for a device not in :data:`PEAK_BF16_TFLOPS` (H100 without "PCIe" in its name is the SXM part; NVL
    variants are not in the table)."""
    n = device_name.upper().replace("-", " ")
    if "NVL" in n:
        return None, f"{device_name!r}: NVL variants are not in the peak table"
    if "H200" in n:  # H200, GH200
        label = "H200 SXM"
    elif "H100" in n:
        label = "H100 PCIe" if "PCIE" in n else "H100 SXM"
    elif "A100" in n:
        label = "A100"
    elif "L40S" in n:
        label = "L40S"
    elif "4090" in n and "RTX" in n:
        label = "RTX 4090"
    else:
        return None, f"{device_name!r} is not in the peak table (pass --peak-tflops)"
    return PEAK_BF16_TFLOPS[label], label


def _driver_version() -> Optional[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def device_info(dry_run: bool = False) -> dict[str, Any]:
    """The device record of the JSON (``dry_run``: the CPU)."""
    base = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "host": platform.node()}
    if dry_run:
        return {"name": f"cpu (dry run, {platform.machine()})", "capability": None, "total_memory_bytes": None,
                "memory_gib": None, "multiprocessors": None, "device_count": 0, "cudnn": None, "driver": None,
                "peak_bf16_tflops": None, "peak_label": None, **base}
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    peak, label = peak_tflops(name)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"name": name, "capability": "{}.{}".format(*torch.cuda.get_device_capability(0)),
            "total_memory_bytes": props.total_memory, "memory_gib": round(props.total_memory / GIB, 2),
            "multiprocessors": props.multi_processor_count, "device_count": torch.cuda.device_count(),
            "cudnn": cudnn, "driver": _driver_version(), "peak_bf16_tflops": peak,
            "peak_label": label if peak is not None else None, **base}


def no_cuda_reason() -> Optional[str]:
    """None when a CUDA device is usable, else the one-line reason (starting ``no CUDA device:``)."""
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, {build}); run this on a GPU node"


def flop_counts(cfg, ids_per_position: float, checkpointing: bool = False) -> dict[str, float]:
    """Training FLOPs per position of ``cfg`` (its ``data.seq_len``, tokenizer kind and vocabulary), by part.

    ``model`` = :func:`megatron_tfree.sweep.flops_per_position` (``6 P_blocks + 12 L h S + 6 h v``) plus the
    embedding bag ``2 n h`` (``n = ids_per_position``); ``hardware`` adds the checkpointing recompute
    (``2 P_blocks + 4 L h S``) when ``checkpointing``. See the module docstring."""
    from megatron_tfree.plan import param_counts, vocab_size
    from megatron_tfree.sweep import flops_per_position

    m = cfg.model
    h, L, S, v = m.hidden_size, m.num_layers, cfg.data.seq_len, vocab_size(cfg)
    p_blocks = param_counts(cfg)["blocks"]
    parts = {"blocks": 6 * p_blocks, "attention": 12 * L * h * S, "head": 6 * h * v,
             "embedding": 2 * float(ids_per_position) * h}
    base = flops_per_position(cfg)
    if base != parts["blocks"] + parts["attention"] + parts["head"]:  # the sweep's formula changed: follow it
        parts["blocks"] = base - parts["attention"] - parts["head"]
    parts["model"] = base + parts["embedding"]
    parts["recompute"] = (2 * p_blocks + 4 * L * h * S) if checkpointing else 0
    parts["hardware"] = parts["model"] + parts["recompute"]
    return parts


# --------------------------------------------------------------------------------------------------
# configs and batches
# --------------------------------------------------------------------------------------------------


def kind_config(base, kind: str, classic_vocab: int, seq_len: int, micro_batch: int, checkpointing: bool,
                precision: str):
    """``base`` for one measured layout: tokenizer kind (and classic vocabulary), sequence length, micro
    batch, checkpointing, precision; one GPU (tensor = pipe = 1, ZeRO 0, no accumulation)."""
    r = dataclasses.replace
    tok = r(base.tokenizer, kind=kind, classic_vocab_size=classic_vocab)
    return r(base, tokenizer=tok, model=r(base.model, activation_checkpointing=checkpointing),
             data=r(base.data, seq_len=seq_len),
             training=r(base.training, micro_batch_size=micro_batch, global_batch_size=0,
                        gradient_accumulation_steps=1, precision=precision),
             parallel=r(base.parallel, tensor=1, pipe=1, zero_stage=0, sequence_parallel=False))


def random_batch(kind: str, batch: int, seq_len: int, vocab: int, population: int, trigrams_per_word: float,
                 gen: torch.Generator, device: torch.device):
    """A random training :class:`~megatron_tfree.data.batch.Batch` shaped like the trainer's (module docstring)."""
    from megatron_tfree.data.batch import Batch

    B, S = batch, seq_len
    pos = torch.arange(S).repeat(B, 1)
    if kind == "classic":
        units = torch.randint(0, vocab, (B, S + 1), generator=gen)
        offsets = torch.arange(B * S + 1, dtype=torch.long)
        inputs, targets = units[:, :-1].reshape(-1), units[:, 1:].reshape(-1)
        b = Batch(offsets, inputs, offsets.clone(), targets, pos, torch.zeros(B, S, dtype=torch.long),
                  torch.ones(B, S))
        return b.to(device)
    hi = max(1, int(round(2 * trigrams_per_word - 1)))
    counts = torch.randint(1, hi + 1, (B, S + 1), generator=gen) * population  # ids per word
    flat = counts.reshape(-1)
    word_start = torch.zeros(flat.numel() + 1, dtype=torch.long)
    word_start[1:] = flat.cumsum(0)
    ids = torch.randint(0, vocab, (int(word_start[-1]),), generator=gen)
    rows_in = (torch.arange(B)[:, None] * (S + 1) + torch.arange(S)[None, :]).reshape(-1)

    def rows(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lens = flat[sel]
        off = torch.zeros(sel.numel() + 1, dtype=torch.long)
        off[1:] = lens.cumsum(0)
        within = torch.arange(int(off[-1])) - torch.repeat_interleave(off[:-1], lens)
        return off, ids[torch.repeat_interleave(word_start[sel], lens) + within]

    in_off, in_ids = rows(rows_in)
    t_off, t_ids = rows(rows_in + 1)  # the next word of the same sequence
    b = Batch(in_off, in_ids, t_off, t_ids, pos, torch.zeros(B, S, dtype=torch.long), torch.ones(B, S))
    return b.to(device)


# --------------------------------------------------------------------------------------------------
# the training step: bf16 model, fp32 master weights + AdamW
# --------------------------------------------------------------------------------------------------


class MixedPrecisionTrainer:
    """``model`` (built in fp32) cast to ``dtype``; with bf16 an fp32 master copy of every parameter is what
    AdamW updates (then copied back), as DeepSpeed's bf16 optimizer does."""

    def __init__(self, model: torch.nn.Module, tcfg, dtype: torch.dtype, device: torch.device):
        from megatron_tfree.model import param_groups

        self.model, self.tcfg, self.device = model, tcfg, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        if dtype == torch.float32:
            self.masters = self.params
        else:
            self.masters = []
            for p in self.params:
                master = p.data
                p.data = master.to(dtype)
                self.masters.append(master)
        by_id = {id(p): m for p, m in zip(self.params, self.masters)}
        self.groups = [{**g, "params": [by_id[id(p)] for p in g["params"]]}
                       for g in param_groups(model, tcfg.weight_decay)]
        self.new_optimizer()

    def new_optimizer(self) -> None:
        t = self.tcfg
        kw = {"fused": True} if self.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(self.groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                     weight_decay=t.weight_decay, **kw)

    def step(self, batch) -> float:
        loss = self.model.loss(batch)
        loss.backward()
        if self.masters is not self.params:
            for p, m in zip(self.params, self.masters):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        if self.tcfg.gradient_clipping > 0:
            torch.nn.utils.clip_grad_norm_(self.masters, self.tcfg.gradient_clipping)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.masters is not self.params:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)
        return float(loss.detach())

    def drop_step(self) -> None:
        """Forget a failed (out-of-memory) step: gradients and (possibly half-made) optimizer state."""
        for p in self.params + (self.masters if self.masters is not self.params else []):
            p.grad = None
        self.opt.state.clear()
        self.new_optimizer()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# one kind
# --------------------------------------------------------------------------------------------------


def setup_ops(device: torch.device, choice: str, notes: list[str]) -> tuple[str, str]:
    """Select the ops backend (``auto``: ``cpp`` if it loads, else the reference) and, on CUDA, load the
    CUDA kernels (prebuilt, else a JIT build). Returns (backend, where the CUDA kernels come from)."""
    from megatron_tfree import ops
    from megatron_tfree.ops import cuda

    if choice == "auto" and device.type == "cpu":
        ops.set_backend("auto")  # never compiles on the CPU dry run
    elif choice == "auto":
        try:
            ops.set_backend("cpp")
        except Exception as e:  # noqa: BLE001 - no compiler etc.: measure the reference path, say so
            notes.append(f"ops backend cpp unavailable ({str(e).splitlines()[0]}); the reference ops ran")
            ops.set_backend("reference")
    else:
        ops.set_backend(choice)
    backend = ops.backend_name()
    if device.type != "cuda":
        return backend, "none (CPU)"
    if backend != "cpp":
        return backend, "none: ops backend is the PyTorch reference"
    try:
        forced = os.environ.get(cuda.JIT_ENV) == "1"
        if cuda.describe():  # loaded for an earlier kind
            mod = cuda.module()
        else:
            mod = cuda.load(jit=forced) or cuda.load(jit=True)
    except cuda.CudaBuildError as e:
        notes.append(f"CUDA kernels unavailable: {str(e).splitlines()[0]}; CUDA tensors ran the reference ops")
        return backend, "none: " + str(e).splitlines()[0]
    return backend, cuda.describe() if mod is not None else "none"


def plan_bytes(cfg, device_gib: float, flash: bool) -> Optional[int]:
    from megatron_tfree.config import ConfigError
    from megatron_tfree.plan import make_plan

    try:
        return int(make_plan(cfg, 1, 1, device_gib, flash=flash)["total_bytes"])
    except ConfigError:
        return None


def candidate_sizes(args, base_cfg, kind: str, checkpointing: bool, device: torch.device, device_gib: float,
                    flash: bool, precision: str) -> list[int]:
    """Micro-batch sizes to try, largest first (see the module docstring)."""
    if args.micro_batch != "auto":
        return [int(args.micro_batch)]
    if device.type != "cuda":
        return [2]
    sizes, s = [], 1
    while s <= args.max_micro_batch:
        sizes.append(s)
        s *= 2
    fits = [s for s in sizes
            if (b := plan_bytes(kind_config(base_cfg, kind, args.classic_vocab, seq_len_of(args, kind), s,
                                            checkpointing, precision), device_gib, flash)) is not None
            and b <= 0.9 * device_gib * GIB]
    start = min(2 * max(fits), sizes[-1]) if fits else 1
    return [s for s in reversed(sizes) if s <= start]


def seq_len_of(args, kind: str) -> int:
    return args.classic_seq_len if kind == "classic" and args.classic_seq_len else args.seq_len


def measure_kind(args, base_cfg, kind: str, device: torch.device, precision: str, deadline: float,
                 notes: list[str]) -> dict[str, Any]:
    from megatron_tfree.model import GPTModel
    from megatron_tfree.model.transformer import _flash_possible
    from megatron_tfree.plan import param_counts, vocab_size

    dtype = PRECISIONS[precision]
    backend, kernels = setup_ops(device, args.ops_backend, notes)
    S = seq_len_of(args, kind)
    cfg0 = kind_config(base_cfg, kind, args.classic_vocab, S, 1, False, precision)
    v, m = vocab_size(cfg0), cfg0.tokenizer.vocab_population
    flash = cfg0.model.attention != "sdpa" and _flash_possible(dtype, device)
    device_gib = (torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else 0.0)
    t_build = time.perf_counter()
    with torch.device(device):
        model = GPTModel(cfg0.model, kind, v, seed=cfg0.training.seed)
    model.train()
    measured_params = sum(p.numel() for p in model.parameters())
    trainer = MixedPrecisionTrainer(model, cfg0.training, dtype, device)
    log(f"{kind}: model built on {device} in {time.perf_counter() - t_build:.1f} s ({measured_params / 1e9:.3f}B "
        f"params, vocab {v}, seq {S}, {precision}, ops {backend}, attention {'flash' if flash else 'sdpa'})")

    modes = {"auto": [False, True], "on": [True], "off": [False]}[args.checkpointing]
    gen = torch.Generator().manual_seed(args.seed)
    attempts: list[dict[str, Any]] = []
    chosen = None
    batches: list = []
    loss_first = None
    for ck in modes:
        for mb in candidate_sizes(args, base_cfg, kind, ck, device, device_gib, flash, precision):
            cfg = kind_config(base_cfg, kind, args.classic_vocab, S, mb, ck, precision)
            predicted = plan_bytes(cfg, device_gib or 80.0, flash)
            model.cfg = cfg.model  # GPTModel.forward reads cfg.activation_checkpointing
            batches = []
            free_memory(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            failed = None
            try:
                batches = [random_batch(kind, mb, S, v, m, args.trigrams_per_word, gen, device) for _ in range(2)]
                loss_first = trainer.step(batches[0])
                synchronize(device)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if not is_oom(e):
                    raise
                failed = "oom"
            attempts.append({"micro_batch": mb, "checkpointing": ck, "result": failed or "ok",
                             "planner_gib": None if predicted is None else round(predicted / GIB, 2)})
            log(f"{kind}: micro batch {mb}, checkpointing {'on' if ck else 'off'}: "
                f"{'out of memory' if failed else 'fits'} (planner {attempts[-1]['planner_gib']} GiB)")
            if failed is None:
                chosen = (mb, ck, cfg, predicted)
                break
            batches = []
            trainer.drop_step()
            free_memory(device)
        if chosen is not None:
            break
    if chosen is None:
        raise RuntimeError(f"{kind}: even micro batch 1 does not fit with activation checkpointing "
                           f"({args.checkpointing}); attempts: {attempts}")
    mb, ck, cfg, predicted = chosen

    for i in range(1, args.warmup):  # the trial step was the first warm-up step
        trainer.step(batches[i % 2])
    synchronize(device)
    times, loss_last = [], loss_first
    for i in range(args.steps):
        if i > 0 and time.time() > deadline:
            notes.append(f"{kind}: --max-seconds reached after {i} of {args.steps} timed steps")
            break
        t0 = time.perf_counter()
        loss_last = trainer.step(batches[i % 2])
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if (i + 1) % 10 == 0 or i + 1 == args.steps:
            log(f"{kind}: step {i + 1}/{args.steps}: {times[-1]:.3f} s, loss {loss_last:.4f}")
    if not all(math.isfinite(x) for x in (loss_first, loss_last)):
        notes.append(f"{kind}: non-finite loss ({loss_first} -> {loss_last})")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    positions = mb * S
    ids = sum(b.input_ids.numel() for b in batches) / (len(batches) * positions)
    flops = flop_counts(cfg, ids, ck)
    mean = sum(times) / len(times)
    pos_s = positions / mean
    upw = args.tfree_units_per_word if kind == "tfree" else args.bpe_tokens_per_word
    pc = param_counts(cfg)
    row = {
        "kind": kind, "vocab": v, "seq_len": S, "micro_batch": mb, "checkpointing": ck,
        "attention": "flash" if flash else "sdpa", "ops_backend": backend, "cuda_kernels": kernels,
        "params": {**pc, "non_embedding": pc["blocks"] + cfg.model.hidden_size,  # blocks + final norm
                   "measured": measured_params},
        "ids_per_position": ids, "steps_timed": len(times), "step_time_s": statistics.median(times),
        "step_time_mean_s": mean, "positions_per_s": pos_s, "tokens_per_s": pos_s, "words_per_s": pos_s / upw,
        "flops_per_position": flops, "model_tflops": flops["model"] * pos_s / 1e12,
        "hardware_tflops": flops["hardware"] * pos_s / 1e12, "mfu": None,
        "peak_memory_bytes": peak, "peak_memory_gib": None if peak is None else peak / GIB,
        "planner_memory_bytes": predicted, "planner_memory_gib": None if predicted is None else predicted / GIB,
        "memory_vs_planner": None if (peak is None or not predicted) else peak / predicted,
        "loss_first": loss_first, "loss_last": loss_last, "attempts": attempts,
    }
    del trainer, model, batches
    free_memory(device)
    return row


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/1b.yaml")
    p.add_argument("--kinds", default="tfree,classic", help="comma-separated: tfree, classic")
    p.add_argument("--classic-vocab", type=int, default=65536, help="the BPE model's vocabulary (default 64k)")
    p.add_argument("--seq-len", type=int, default=4096, help="positions per sequence (T-Free: words)")
    p.add_argument("--classic-seq-len", type=int, default=0, help="the BPE model's sequence (0: --seq-len)")
    p.add_argument("--micro-batch", default="auto", help="auto (largest that fits) or a number")
    p.add_argument("--max-micro-batch", type=int, default=64, help="largest size auto tries")
    p.add_argument("--steps", type=int, default=30, help="timed steps per kind")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (the micro-batch trial is one)")
    p.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--peak-tflops", default="auto", help="auto (device table) or the peak TFLOP/s for MFU")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16",
                   help="bf16 (fp32 master weights) or fp32 throughout")
    p.add_argument("--ops-backend", choices=("auto", "cpp", "reference"), default="auto")
    p.add_argument("--trigrams-per-word", type=float, default=None,
                   help="mean trigrams per T-Free word of the random batches (default: the planner's 6)")
    p.add_argument("--tfree-units-per-word", type=float, default=1.0, help="T-Free positions per word")
    p.add_argument("--bpe-tokens-per-word", type=float, default=1.3, help="BPE tokens per word (assumed)")
    p.add_argument("--max-seconds", type=float, default=0, help="stop timed steps after this long (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="run on the CPU (smoke test; numbers mean nothing)")
    p.add_argument("--device-info", action="store_true", help="only write/print the device record")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return p


def write_json(path: Optional[str], data: dict) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, out)


def print_table(result: dict) -> None:
    rows = list(result["kinds"].values())
    print(f"{result['device']['name']}: peak {result['peak_tflops']} TFLOP/s ({result['peak_source']}), "
          f"{result['precision']}")
    print(f"{'kind':<8}{'vocab':>7}{'mb':>4}{'ckpt':>6}{'step s':>9}{'pos/s':>11}{'words/s':>11}{'TFLOP/s':>9}"
          f"{'MFU':>7}{'peak GiB':>10}{'plan GiB':>10}")
    for r in rows:
        mfu = "" if r["mfu"] is None else f"{r['mfu']:.1%}"
        pk = "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        pl = "" if r["planner_memory_gib"] is None else f"{r['planner_memory_gib']:.1f}"
        print(f"{r['kind']:<8}{r['vocab']:>7}{r['micro_batch']:>4}{'on' if r['checkpointing'] else 'off':>6}"
              f"{r['step_time_s']:>9.3f}{r['positions_per_s']:>11,.0f}{r['words_per_s']:>11,.0f}"
              f"{r['model_tflops']:>9.1f}{mfu:>7}{pk:>10}{pl:>10}")
    if result.get("tfree_vs_classic_words_per_s") is not None:
        print(f"T-Free words/s / BPE words/s: {result['tfree_vs_classic_words_per_s']:.2f}")
    for n in result["notes"]:
        print(f"note: {n}")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device_info:
        reason = None if args.dry_run else no_cuda_reason()
        if reason:
            print(reason, file=sys.stderr)
            return 2
        info = device_info(args.dry_run)
        write_json(args.json, info)
        print(json.dumps(info))
        return 0
    reason = None if args.dry_run else no_cuda_reason()
    if reason:
        print(f"{reason} (or pass --dry-run for a CPU smoke test)", file=sys.stderr)
        return 2
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        print(f"--kinds: unknown {bad or kinds}; choose from {', '.join(KINDS)}", file=sys.stderr)
        return 1
    if args.micro_batch != "auto" and not (args.micro_batch.isdigit() and int(args.micro_batch) > 0):
        print(f"--micro-batch must be auto or a positive integer, got {args.micro_batch!r}", file=sys.stderr)
        return 1
    if args.steps < 1 or args.warmup < 1:
        print("--steps and --warmup must be >= 1", file=sys.stderr)
        return 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from megatron_tfree.config import load_config
    from megatron_tfree.plan import TRIGRAMS_PER_WORD

    if args.trigrams_per_word is None:
        args.trigrams_per_word = float(TRIGRAMS_PER_WORD)
    device = torch.device("cpu" if args.dry_run else "cuda")
    precision = args.precision
    base_cfg = load_config(args.config, args.overrides)
    dev = device_info(args.dry_run)
    notes: list[str] = []
    if args.peak_tflops == "auto":
        peak, source = dev["peak_bf16_tflops"], dev["peak_label"] or "unknown device"
        if peak is None and not args.dry_run:
            notes.append(f"MFU is null: {peak_tflops(dev['name'])[1]}")
    else:
        peak, source = float(args.peak_tflops), "--peak-tflops"
    if precision != "bf16" and peak is not None:
        notes.append(f"precision {precision}: MFU is still against the bf16 peak")
    result: dict[str, Any] = {
        "device": dev, "dry_run": args.dry_run, "config": args.config, "overrides": args.overrides,
        "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
        "precision": (f"{precision} weights/activations/gradients, fp32 master weights + fp32 AdamW state"
                      if precision != "fp32" else "fp32 weights, gradients and AdamW state"),
        "peak_tflops": peak, "peak_source": source, "peak_note": PEAK_NOTE, "flops_formula": FLOPS_FORMULA,
        "assumptions": {"tfree_units_per_word": args.tfree_units_per_word,
                        "bpe_tokens_per_word": args.bpe_tokens_per_word,
                        "trigrams_per_word": args.trigrams_per_word},
        "kinds": {}, "tfree_vs_classic_words_per_s": None, "mfu": None, "notes": notes,
    }
    start = time.time()
    for i, kind in enumerate(kinds):
        left = args.max_seconds - (time.time() - start) if args.max_seconds > 0 else math.inf
        deadline = time.time() + left / (len(kinds) - i)  # share what is left over the remaining kinds
        row = measure_kind(args, base_cfg, kind, device, precision, deadline, notes)
        if peak:
            row["mfu"] = row["model_tflops"] / peak
        result["kinds"][kind] = row
        k = result["kinds"]
        if "tfree" in k and "classic" in k:
            result["tfree_vs_classic_words_per_s"] = k["tfree"]["words_per_s"] / k["classic"]["words_per_s"]
        result["mfu"] = k.get("tfree", {}).get("mfu")
        write_json(args.json, result)
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
