"""Scaling of the tiny model over (TP, PP, DP) layouts on CPU: step time beside (1, 1, 1), and the bytes
each rank hands to torch.distributed per step, counted (not estimated), for every layout and for TP=2
T-Free vs classic heads.

Every layout trains the same config (``--config``, default configs/tiny.yaml, plus ``section.key=value``
overrides) with the same global batch (``--global-batch`` samples of ``--micro-batch``: gradient
accumulation = global / (micro * dp)), fp32, dropout as configured, no evaluation, on a generated corpus
(pseudo-words, written to a temporary directory) or ``--prefix`` (a MemoryMap) or ``--config-corpus``
(the config's ``data.prefix_paths``, empty: the default Shakespeare corpus). Each layout runs in
``tp * pp * dp`` gloo processes through :func:`megatron_tfree.training.train`; in each process the
trainer's ``train_step`` is timed and, during the timed steps (after ``--warmup`` steps), every
``torch.distributed`` call is counted by :class:`comm_counter.CommCounter` (installed before DeepSpeed
initialises its comm layer, so DeepSpeed's own collectives and pipeline sends are counted too).

* step time: per step the slowest rank, then the median over the timed steps; ratio vs (1, 1, 1)
  measured in the same run. Each process gets ``--threads`` torch threads (0: cores // processes, at
  least 1); more processes than cores oversubscribe the CPU (said in the footer).
* bytes: payload bytes per step per rank (see comm_counter's table), by op and by group kind (TP, DP,
  PP, world); one-rank groups ("solo") move nothing and are left out of the totals.
* sanity: (1, 1, 2) with ZeRO-0, whose DP gradient all-reduce per step should be the number of
  parameters x 4 bytes (fp32).
* TP=2 T-Free vs classic at (2, 1, 1): bytes by op, group and call size for both, and the difference
  the vocab-parallel losses predict (classic CE: 3 all-reduces of [N] fp32 per micro-batch; T-Free BCE:
  one scalar).

    python benchmarks/scaling.py [--steps 8] [--json out.json] [model.hidden_size=64 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2)]
GROUPS = ("TP", "DP", "PP", "MP", "world", "other")


# --------------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------------


def generated_texts(seed: int = 0, docs: int = 8, words_per_doc: int = 6000, lexicon: int = 8000) -> list[str]:
    """Documents of Zipf-distributed pseudo-words (enough distinct words for a BPE of a few thousand)."""
    rng = random.Random(seed)
    onsets, vowels, codas = "b c d f g h k l m n p r s t v w z br st tr pl ch sh th".split(), "a e i o u ai ou ea".split(), ["", "n", "r", "s", "t", "ck", "ng"]
    words: set[str] = set()
    while len(words) < lexicon:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3))) + rng.choice(codas))
    lex = sorted(words)
    rng.shuffle(lex)
    weights = [1.0 / (i + 1) for i in range(len(lex))]
    out = []
    for _ in range(docs):
        sentences, n = [], 0
        while n < words_per_doc:
            k = rng.randint(4, 14)
            sentences.append(" ".join(rng.choices(lex, weights, k=k)).capitalize() + rng.choice(".,.!?"))
            n += k
        out.append(" ".join(sentences))
    return out


def make_corpus(directory: Path, max_bytes: int) -> str:
    from megatron_tfree.data.convert import align_memory_map, convert_text_files

    src = directory / "corpus_txt"
    src.mkdir(parents=True)
    for i, doc in enumerate(generated_texts()):
        (src / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    prefix = directory / "corpus"
    convert_text_files([src], prefix, split="file", progress=False)
    align_memory_map(prefix, max_bytes=max_bytes, progress=False)
    return str(prefix)


# --------------------------------------------------------------------------------------------------
# one layout: worker processes
# --------------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, job: dict, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    import torch.distributed as dist

    from comm_counter import CommCounter

    if job.get("log"):  # DeepSpeed banners and progress bars go to a log file, not the tables
        fd = os.open(f"{job['log']}.rank{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    torch.set_num_threads(job["threads"])
    counter = CommCounter().install()  # before DeepSpeed's comm layer captures any function
    counter.log = []
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from megatron_tfree.parallel import state
        from megatron_tfree.training import loop

        original = loop.train_step
        times: list[float] = []
        info: dict[str, Any] = {}

        def timed_step(*args: Any, **kwargs: Any) -> Any:
            timed = len(times) >= job["warmup"]
            if timed:
                counter.start()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                times.append(time.perf_counter() - start)
                counter.stop()

        def on_step(step: int, engine: Any, record: dict) -> None:
            if "params" not in info:
                params = list(engine.module.parameters())
                info["params"] = sum(p.numel() for p in params)
                info["param_bytes"] = sum(p.numel() * p.element_size() for p in params)
                info["gas"] = engine.gradient_accumulation_steps()
            info["loss"] = record["loss"]

        loop.train_step = timed_step
        try:
            loop.train(job["cfg"], on_step=on_step)
        finally:
            loop.train_step = original
        s = state.get()
        calls: dict[tuple[str, str, int], int] = defaultdict(int)
        for op, group, nbytes in counter.log:
            calls[(op, group, nbytes)] += 1
        result = {"rank": rank, "tp_rank": s.tp_rank, "pp_rank": s.pp_rank, "dp_rank": s.dp_rank,
                  "step_times": times, "counts": [[op, g, v["calls"], v["bytes"]] for (op, g), v in counter.totals().items()],
                  "call_sizes": [[op, g, b, n] for (op, g, b), n in sorted(calls.items())], **info}
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        counter.uninstall()
        try:
            from megatron_tfree.parallel.spawn import teardown

            teardown()
        except Exception:
            pass


def run_processes(world: int, job: dict, timeout: float) -> list[dict]:
    import torch.multiprocessing as mp

    from megatron_tfree.parallel.spawn import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, job, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    error = None
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                error = f"rank {rank}:\n{value}"
                break
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30 if error is None else 5)
            if p.is_alive():
                p.kill()
    if error:
        raise RuntimeError("layout run failed\n" + error)
    return [results[r] for r in range(world)]


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------


def summarize(ranks: list[dict], steps: int) -> dict:
    """Step time (slowest rank per step, median over timed steps) and bytes per step per rank."""
    warm = len(ranks[0]["step_times"]) - steps
    per_step = [max(r["step_times"][warm + i] for r in ranks) for i in range(steps)]
    by_rank = []
    for r in ranks:
        ops: dict[str, float] = defaultdict(float)
        groups: dict[str, float] = defaultdict(float)
        calls: dict[str, float] = defaultdict(float)
        for op, g, n, b in r["counts"]:
            if g == "solo":
                continue
            ops[f"{op}/{g}"] += b / steps
            calls[f"{op}/{g}"] += n / steps
            groups[g] += b / steps
        by_rank.append({"rank": r["rank"], "coords": [r["tp_rank"], r["pp_rank"], r["dp_rank"]],
                        "bytes_per_step": sum(groups.values()), "by_group": dict(groups), "by_op": dict(ops),
                        "calls_per_step": dict(calls), "params": r.get("params"), "param_bytes": r.get("param_bytes"),
                        "call_sizes": [[op, g, b, n / steps] for op, g, b, n in r["call_sizes"] if g != "solo"]})
    totals = [r["bytes_per_step"] for r in by_rank]
    return {"step_time_s": statistics.median(per_step), "step_times_s": per_step,
            "bytes_per_step_rank_mean": statistics.fmean(totals), "bytes_per_step_rank_max": max(totals),
            "by_group_mean": {g: statistics.fmean(r["by_group"].get(g, 0.0) for r in by_rank) for g in GROUPS
                              if any(g in r["by_group"] for r in by_rank)},
            "ranks": by_rank, "gas": ranks[0].get("gas"), "final_loss": ranks[0].get("loss")}


def fmt_bytes(b: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def build_cfg(args: argparse.Namespace, workdir: Path, name: str, kind: str, tp: int, pp: int, zero: int, prefix: str | None,
              tokenizer_file: str = "") -> Any:
    from megatron_tfree.config import load_config

    extra = [f"parallel.tensor={tp}", f"parallel.pipe={pp}", f"parallel.zero_stage={zero}",
             f"tokenizer.kind={kind}", f"training.micro_batch_size={args.micro_batch}",
             f"training.global_batch_size={args.global_batch}", "training.gradient_accumulation_steps=1",
             f"training.train_iterations={args.warmup + args.steps}", "training.eval_iterations=0",
             "training.precision=fp32", "training.tensorboard=false", f"training.save_interval={10**9}",
             f"training.log_interval={10**9}", f"training.eval_interval={10**9}",
             f"training.save_dir={workdir / 'runs' / name}"]
    if prefix:
        extra += [f"data.prefix_paths=[{prefix}]", f"data.valid_prefix_paths=[{prefix}]"]
    if kind == "classic":
        extra += [f"tokenizer.classic_vocab_size={args.classic_vocab}", f"tokenizer.tokenizer_file={tokenizer_file}"]
    return load_config(args.config, list(args.overrides) + extra)


def fit_classic(args: argparse.Namespace, workdir: Path, prefix: str | None) -> str:
    """Fit the classic BPE once (all classic runs share it); its vocabulary must split over TP=2."""
    from megatron_tfree.data.sources import tokenizer_for_config

    path = workdir / "classic_bpe.json"
    for _ in range(3):
        cfg = build_cfg(args, workdir, "classic-fit", "classic", 1, 1, 0, prefix, str(path))
        tok = tokenizer_for_config(cfg, progress=False)
        if tok.vocab_size % 2 == 0:
            return str(path)
        path.unlink()
        args.classic_vocab = tok.vocab_size - 1  # the corpus ran out of merges: one fewer, even
    raise RuntimeError(f"could not fit a classic BPE with an even vocabulary (last {tok.vocab_size})")


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--prefix", default=None, help="MemoryMap prefix to train on (default: a generated corpus)")
    p.add_argument("--config-corpus", action="store_true",
                   help="train on the config's data.prefix_paths (empty: the default Shakespeare corpus)")
    p.add_argument("--layouts", nargs="*", default=[",".join(map(str, l)) for l in LAYOUTS],
                   help="TP,PP,DP triples (the first is the baseline of the ratios)")
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage of layouts with DP > 1 (DP = 1: ZeRO-0)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=2, help="untimed, uncounted steps first")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores // processes)")
    p.add_argument("--classic-vocab", type=int, default=0, help="classic BPE vocabulary (0: tokenizer.vocab_size)")
    p.add_argument("--no-compare", action="store_true", help="skip the TP=2 T-Free vs classic comparison")
    p.add_argument("--no-sanity", action="store_true", help="skip the (1,1,2) ZeRO-0 all-reduce check")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per layout run")
    p.add_argument("--keep", action="store_true", help="keep the working directory (corpus, runs, logs)")
    p.add_argument("--verbose", action="store_true", help="let the trainer processes print (default: logs/)")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from megatron_tfree.config import load_config

    layouts = [tuple(int(x) for x in s.split(",")) for s in args.layouts]
    if any(len(l) != 3 for l in layouts):
        p.error("--layouts takes TP,PP,DP triples")
    base_cfg = load_config(args.config, list(args.overrides))
    if not args.classic_vocab:
        args.classic_vocab = base_cfg.tokenizer.vocab_size
    cores = os.cpu_count() or 1
    workdir = Path(tempfile.mkdtemp(prefix="scaling_"))
    t_start = time.perf_counter()
    try:
        prefix = args.prefix
        if not prefix and not args.config_corpus:
            prefix = make_corpus(workdir, base_cfg.data.aligned_max_bytes)
        corpus = prefix or "config corpus (data.prefix_paths / default Shakespeare)"

        def run(kind: str, layout: tuple[int, int, int], zero: int, tokenizer_file: str = "") -> dict:
            tp, pp, dp = layout
            world = tp * pp * dp
            threads = args.threads or max(1, cores // world)
            name = f"{kind}-tp{tp}-pp{pp}-dp{dp}-zero{zero}"
            cfg = build_cfg(args, workdir, name, kind, tp, pp, zero, prefix, tokenizer_file)
            t0 = time.perf_counter()
            log = None if args.verbose else str(workdir / "logs" / name)
            if log:
                (workdir / "logs").mkdir(exist_ok=True)
            ranks = run_processes(world, {"cfg": cfg, "warmup": args.warmup, "threads": threads, "log": log},
                                  args.timeout)
            out = summarize(ranks, args.steps)
            out.update(kind=kind, layout=list(layout), zero=zero, processes=world, threads=threads,
                       wall_s=time.perf_counter() - t0)
            print(f"  {name}: {out['step_time_s'] * 1e3:.0f} ms/step, {fmt_bytes(out['bytes_per_step_rank_mean'])}"
                  f"/step/rank ({out['wall_s']:.0f} s)", flush=True)
            return out

        h = base_cfg.model
        print(f"model h={h.hidden_size} L={h.num_layers} heads={h.num_attention_heads}, T-Free v={base_cfg.tokenizer.vocab_size}, "
              f"seq_len {base_cfg.data.seq_len}, global batch {args.global_batch} (micro {args.micro_batch}), "
              f"{args.warmup} warm-up + {args.steps} timed steps; corpus: {corpus}; {cores} CPU cores", flush=True)
        rows = [run("tfree", l, args.zero if l[2] > 1 else 0) for l in layouts]
        sanity = None
        if not args.no_sanity:
            sanity = run("tfree", (1, 1, 2), 0)
        compare = None
        if not args.no_compare:
            bpe = fit_classic(args, workdir, prefix)
            tfree_tp2 = next((r for r in rows if tuple(r["layout"]) == (2, 1, 1)), None) or run("tfree", (2, 1, 1), 0)
            compare = {"tfree": tfree_tp2, "classic": run("classic", (2, 1, 1), 0, bpe), "classic_vocab": args.classic_vocab}
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    runtime = time.perf_counter() - t_start

    # ---------------------------------------------------------------------------------- layout table
    base = rows[0]
    print()
    print(f"{'TP,PP,DP':<10}{'ZeRO':>5}{'procs':>6}{'thr':>4}{'gas':>4}{'step ms':>9}{'vs base':>8}"
          f"{'bytes/step/rank':>17}{'max rank':>11}   by group (mean over ranks)")
    for r in rows:
        r["step_time_vs_base"] = r["step_time_s"] / base["step_time_s"]
        groups = ", ".join(f"{g} {fmt_bytes(b)}" for g, b in r["by_group_mean"].items()) or "-"
        print(f"{','.join(map(str, r['layout'])):<10}{r['zero']:>5}{r['processes']:>6}{r['threads']:>4}{r['gas']:>4}"
              f"{r['step_time_s'] * 1e3:>9.0f}{r['step_time_vs_base']:>7.2f}x{fmt_bytes(r['bytes_per_step_rank_mean']):>17}"
              f"{fmt_bytes(r['bytes_per_step_rank_max']):>11}   {groups}")
    over = [r for r in rows if r["processes"] > cores]
    print(f"step time: slowest rank per step, median of {args.steps} steps; 'vs base' = step time / "
          f"{','.join(map(str, base['layout']))}'s ({cores} CPU cores; threads per process = cores // processes)"
          if not args.threads else f"step time: median of {args.steps} steps ({cores} CPU cores, {args.threads} threads per process")
    if over:
        print(f"  layouts with more processes than the {cores} cores ({', '.join(','.join(map(str, r['layout'])) for r in over)}) "
              f"oversubscribe the CPU: their step times measure time-sharing, not scaling")
    print("bytes: payload handed to torch.distributed per step per rank (counted; one-rank groups excluded; "
          "send and recv both counted)")

    # ---------------------------------------------------------------------------------- sanity
    if sanity is not None:
        r0 = sanity["ranks"][0]
        grad_ar = r0["by_op"].get("all_reduce/DP", 0.0)
        expect = r0["param_bytes"]
        sanity["check"] = {"dp_all_reduce_bytes_per_step": grad_ar, "param_bytes": expect, "params": r0["params"],
                           "ratio": grad_ar / expect if expect else None,
                           "other_ops": {k: v for k, v in r0["by_op"].items() if k != "all_reduce/DP"}}
        sizes = ", ".join(f"{n:g} x {b:,} B" for op, g, b, n in r0["call_sizes"] if (op, g) == ("all_reduce", "DP"))
        print(f"\nsanity (1,1,2) ZeRO-0: DP all-reduce {grad_ar:,.0f} B/step/rank ({sizes}) vs parameters "
              f"{r0['params']:,} x 4 B = {expect:,} B: ratio {grad_ar / expect:.6f}; other calls: "
              + (", ".join(f"{k} {v:,.0f} B" for k, v in sanity["check"]["other_ops"].items()) or "none"))

    # ---------------------------------------------------------------------------------- TP=2 comparison
    if compare is not None:
        t, c = compare["tfree"]["ranks"][0], compare["classic"]["ranks"][0]
        keys = sorted(set(t["by_op"]) | set(c["by_op"]))
        print(f"\nTP=2 (2,1,1), bytes per step per rank (rank 0; T-Free v={base_cfg.tokenizer.vocab_size}, classic BPE "
              f"v={compare['classic_vocab']}; {compare['tfree']['gas']} micro-batches of {args.micro_batch} x {base_cfg.data.seq_len})")
        print(f"{'op/group':<26}{'T-Free':>12}{'calls':>7}{'classic':>12}{'calls':>7}{'classic/T-Free':>16}")
        table = []
        for k in keys + ["total"]:
            tb = t["bytes_per_step"] if k == "total" else t["by_op"].get(k, 0.0)
            cb = c["bytes_per_step"] if k == "total" else c["by_op"].get(k, 0.0)
            tn = sum(t["calls_per_step"].values()) if k == "total" else t["calls_per_step"].get(k, 0.0)
            cn = sum(c["calls_per_step"].values()) if k == "total" else c["calls_per_step"].get(k, 0.0)
            table.append({"op": k, "tfree_bytes": tb, "classic_bytes": cb, "tfree_calls": tn, "classic_calls": cn})
            ratio = f"{cb / tb:.4f}x" if tb else "-"
            print(f"{k:<26}{tb:>12,.0f}{tn:>7.0f}{cb:>12,.0f}{cn:>7.0f}{ratio:>16}")
        compare["table"] = table
        sizes: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for i, side in enumerate((t, c)):
            for op, g, b, n in side["call_sizes"]:
                sizes[(f"{op}/{g}", b)][i] += n
        diff = [(k, b, n[0], n[1]) for (k, b), n in sorted(sizes.items()) if n[0] != n[1]]
        compare["call_size_differences"] = [{"op": k, "bytes_per_call": b, "tfree_calls": a, "classic_calls": d}
                                            for k, b, a, d in diff]
        print("calls per step that differ (op/group, bytes per call: T-Free calls vs classic calls):")
        for k, b, a, d in diff:
            print(f"  {k:<24}{b:>10,} B: {a:>5.0f} vs {d:>5.0f}")
        gas, n_pos = compare["tfree"]["gas"], args.micro_batch * base_cfg.data.seq_len
        predicted = gas * (3 * n_pos * 4 - 4)
        measured = c["bytes_per_step"] - t["bytes_per_step"]
        compare["difference"] = {"measured": measured, "predicted_by_losses": predicted, "positions_per_micro_batch": n_pos}
        print(f"difference classic - T-Free: {measured:,.0f} B/step; the losses predict {gas} micro-batches x "
              f"(3 x {n_pos} positions x 4 B (CE max, target logit, sum of exp) - 4 B (BCE scalar)) = {predicted:,.0f} B")
    for r in rows:  # how the DP bytes of ZeRO layouts split (DeepSpeed on gloo)
        if r["zero"] and r["layout"][2] > 1:
            r0 = r["ranks"][0]
            parts = ", ".join(f"{op}/{g} {n:g} x {b:,} B" for op, g, b, n in r0["call_sizes"] if g == "DP")
            print(f"ZeRO-{r['zero']} at {','.join(map(str, r['layout']))}, DP calls per step on rank 0: {parts} "
                  f"(local parameters {r0['params']:,} = {r0['param_bytes']:,} B)")
    print(f"\nruntime {runtime:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "config": args.config, "overrides": args.overrides,
                                               "corpus": corpus, "global_batch": args.global_batch,
                                               "micro_batch": args.micro_batch, "steps": args.steps,
                                               "warmup": args.warmup, "layouts": rows, "sanity": sanity,
                                               "tp2_compare": compare, "runtime_s": runtime}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
