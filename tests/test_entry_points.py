"""Every `python -m` entry point and every tool answers --help (a fresh process each)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["megatron_tfree.train", "megatron_tfree.generate", "megatron_tfree.prepare",
                                    "megatron_tfree.data.convert"])
def test_python_m_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()


@pytest.mark.parametrize("tool", sorted(p.name for p in (REPO / "tools").glob("*.py")))
def test_tool_help(tool):
    proc = subprocess.run([sys.executable, f"tools/{tool}", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()
