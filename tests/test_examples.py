"""Every script in ``examples/`` runs in ``--quick`` mode, in its own process, and does its job.

``data_parallel.py`` runs under ``torchrun`` with two gloo ranks on the CPU. A script added to
``examples/`` later is run here too (with ``--quick``), and must at least exit cleanly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
TIMEOUT = 240  # seconds; each takes a few on 2 CPU cores


def run(script: str) -> str:
    command = [sys.executable, str(EXAMPLES / script), "--quick"]
    if script == "data_parallel.py":
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_documented_examples_are_all_here() -> None:
    expected = {"digits_mlp.py", "char_lstm_tbptt.py", "ensemble_sweep.py", "data_parallel.py"}
    assert expected <= set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_quick(script: str) -> None:
    out = run(script)
    if script == "digits_mlp.py":
        acc = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))
        assert acc > 0.8, out
    elif script == "char_lstm_tbptt.py":
        bpc = [float(x) for x in re.findall(r"val_bpc ([0-9.]+)", out)]
        assert len(bpc) == 2 and bpc[-1] < bpc[0], out
    elif script == "ensemble_sweep.py":
        accs = [float(x) for x in re.findall(r"^\s+\d+\s+[0-9.]+\s+([0-9.]+)", out, re.M)]
        assert len(accs) == 8, out
        assert max(accs) > 0.9 and min(accs) < max(accs) - 0.2, out  # the sweep matters
    elif script == "data_parallel.py":
        assert "2 ranks; test accuracy" in out, out
        acc = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))
        assert acc > 0.8, out
