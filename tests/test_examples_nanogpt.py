"""``examples/nanogpt.py --quick`` runs to the end and learns: the training and validation
losses go down, and the run ends with a sample of generated text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(
    r"^step +(\d+)  loss ([\d.]+)  val_loss ([\d.]+)  ema_val_loss ([\d.]+)  lr ([\d.e+-]+)"
)


def test_nanogpt_quick_run_learns() -> None:
    # One intra-op thread: tiny kernels gain nothing from two, and OpenMP's barriers turn
    # pathological (ten times slower) when other processes share the cores.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "nanogpt.py"), "--quick", "--seed", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    ).stdout
    rows = [tuple(float(x) for x in m.groups()) for m in map(LINE.match, out.splitlines()) if m]
    assert [int(r[0]) for r in rows] == [40, 80, 120, 160, 200, 240], out
    first, last = rows[0], rows[-1]
    assert last[1] < first[1] - 0.5, out  # training loss
    assert last[2] < first[2] - 0.2, out  # validation loss
    assert last[3] < first[3] - 0.2, out  # validation loss of the moving average
    assert last[4] < first[4], out  # the cosine schedule decays
    assert "stopped: max_steps=240 reached" in out
    sample = out.split("--- sample (EMA params) ---\n", 1)[1]
    assert sample.startswith("def") and len(sample) > 150
