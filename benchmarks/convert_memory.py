#!/usr/bin/env python
"""Peak memory of exporting a checkpoint saved at (TP, PP) = (2, 2), against its size.

    python benchmarks/convert_memory.py [--hidden 1024 --layers 16 --vocab 8192] [--json out.json]

Builds a T-Free model of about 1 GB of fp32 weights (random weights, written as a weights-only
consolidated directory), writes it as a DeepSpeed checkpoint at TP=2, PP=2 (4 CPU processes; ZeRO-0,
so the files also hold Adam moments), then measures in fresh processes, after the imports:

* ``export``: ``tools/convert2hf.py`` (the streaming reader: one layer's files memory-mapped, one full
  tensor at a time, file pages released once read) into fp32 safetensors;
* ``whole model``: the same checkpoint read at once (``CheckpointReader.state_dict()``) and written
  with ``safetensors.torch.save_file``, what an exporter without streaming does (the baseline).

The baseline is the process after importing torch, transformers, DeepSpeed and this package and
building a meta-device model once (torch loads its meta machinery on first use). Peak RSS is the
kernel's high-water mark (``VmHWM``, reset there through ``/proc/self/clear_refs``); anonymous and
file-backed resident memory (``RssAnon``, ``RssFile``) are
sampled every millisecond. File-backed pages are the memory-mapped checkpoint files (page cache the
kernel can drop), anonymous pages are what the process itself allocates. Ratios are against the
largest single parameter and the checkpoint's weights. Target: peak extra memory of the export at
most 1.5x the largest parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------------------------------
# the checkpoint
# --------------------------------------------------------------------------------------------------


def make_checkpoint(work: Path, hidden: int, layers: int, vocab: int) -> tuple[Path, dict]:
    import torch

    from megatron_tfree.checkpoint import atomic_output_dir, param_specs
    from megatron_tfree.checkpoint.consolidated import write_weights_only
    from megatron_tfree.config import Config
    from megatron_tfree.tokenizer import TrigramTokenizer
    from megatron_tfree.training.consolidate import to_deepspeed

    cfg = Config.from_dict({"model": {"hidden_size": hidden, "num_layers": layers, "num_attention_heads": 16,
                                      "mlp_factor": 2.66796875},
                            "tokenizer": {"kind": "tfree", "vocab_size": vocab, "vocab_population": 10},
                            "training": {"save_dir": str(work / "ckpt")}}, source="convert_memory")
    tokenizer = TrigramTokenizer.from_config(cfg.tokenizer)
    specs = param_specs(cfg.model, "tfree", vocab)
    gen = torch.Generator().manual_seed(0)
    tensors = ((s.name, torch.randn(s.shape, generator=gen) * 0.02) for s in specs.values())
    with atomic_output_dir(work / "weights") as tmp:
        write_weights_only(tmp, cfg, tokenizer, tensors, specs, {"format": "benchmark"})
        (tmp / "word_counts.json").write_text(json.dumps({w: 1 for w in "the king and queen speak".split()}))
    tag = to_deepspeed(work / "weights", work / "ckpt", tensor=2, pipe=2)
    numel = {n: s.numel for n, s in specs.items()}
    largest = max(numel, key=numel.get)
    info = {"parameters": sum(numel.values()), "weights_bytes": 4 * sum(numel.values()),
            "largest_parameter": largest, "largest_parameter_bytes": 4 * numel[largest],
            "checkpoint_dir_bytes": sum(p.stat().st_size for p in tag.rglob("*") if p.is_file())}
    shutil.rmtree(work / "weights")
    return tag, info


# --------------------------------------------------------------------------------------------------
# measuring (in a child process)
# --------------------------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def child(mode: str, tag: str, out: str) -> dict:
    import deepspeed  # noqa: F401  (the libraries are part of the baseline)
    import torch
    import transformers  # noqa: F401
    from safetensors.torch import save_file

    from megatron_tfree import convert2hf
    from megatron_tfree.checkpoint import CheckpointReader, param_specs
    from megatron_tfree.checkpoint.memory import return_freed_memory
    from megatron_tfree.config import ModelConfig

    param_specs(ModelConfig(num_layers=1), "tfree", 64)  # torch's meta-device machinery, loaded on first use
    return_freed_memory()  # as convert2hf does (for both modes)
    base = _status()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    peak = {"RssAnon": base["RssAnon"], "RssFile": base["RssFile"]}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            s = _status()
            for k in peak:
                peak[k] = max(peak[k], s[k])
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    if mode == "export":
        if convert2hf.main(["--checkpoint", tag, "--out", out]) != 0:
            raise RuntimeError("convert2hf failed")
    else:
        save_file(CheckpointReader(tag).state_dict(), str(Path(out) / "model.safetensors"))
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    end = _status()
    return {"seconds": seconds, "extra_peak_rss": end["VmHWM"] - base["VmRSS"],
            "extra_peak_anon": peak["RssAnon"] - base["RssAnon"], "extra_peak_file": peak["RssFile"] - base["RssFile"]}


def measure(mode: str, tag: Path, work: Path) -> dict:
    out = work / f"out-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    if mode != "export":
        out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "2", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(tag), str(out)], capture_output=True,
                          text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--workdir", default=None, help="where the checkpoint goes (default: a temp dir, removed)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", nargs=3, metavar=("MODE", "TAG", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        tag, info = make_checkpoint(work, args.hidden, args.layers, args.vocab)
        print(f"checkpoint (TP=2, PP=2, ZeRO-0): {info['parameters'] / 1e6:.1f}M parameters, "
              f"{info['weights_bytes'] / 1e9:.2f} GB of fp32 weights, {info['checkpoint_dir_bytes'] / 1e9:.2f} GB on "
              f"disk with Adam moments; largest parameter {info['largest_parameter']} "
              f"{info['largest_parameter_bytes'] / 1e6:.1f} MB ({time.perf_counter() - start:.0f} s to make)")
        rows = {mode: measure(mode, tag, work) for mode in ("export", "whole model")}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    big, weights = info["largest_parameter_bytes"], info["weights_bytes"]
    print(f"\n{'':12} {'seconds':>8} {'peak RSS +MB':>13} {'anon +MB':>9} {'file +MB':>9} "
          f"{'RSS/largest':>12} {'anon/largest':>13} {'RSS/weights':>12}")
    for mode, r in rows.items():
        print(f"{mode:12} {r['seconds']:8.1f} {r['extra_peak_rss'] / 1e6:13.1f} {r['extra_peak_anon'] / 1e6:9.1f} "
              f"{r['extra_peak_file'] / 1e6:9.1f} {r['extra_peak_rss'] / big:12.2f} {r['extra_peak_anon'] / big:13.2f} "
              f"{r['extra_peak_rss'] / weights:12.3f}")
    ratio = rows["export"]["extra_peak_rss"] / rows["whole model"]["extra_peak_rss"]
    print(f"\nexport peak extra RSS = {ratio:.3f}x the whole-model read's; target <= 1.5x the largest parameter: "
          f"{rows['export']['extra_peak_rss'] / big:.2f}x ({'met' if rows['export']['extra_peak_rss'] <= 1.5 * big else 'not met'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": info, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
