"""Peak memory of one workload (default W2) per contestant, each in a fresh process.

    python benchmarks/bench_memory.py                       # W2, CPU, 10 optimizer steps
    python benchmarks/bench_memory.py --contestants hand,looplib,looplib_donated,looplib_fold
    python benchmarks/bench_memory.py --workloads W1,W4 --steps 20 --device cuda

Each contestant runs in its own interpreter (``common.py --memory-child``). The child builds the
data and the initial weights, runs the contestant once on a throwaway tiny model (so lazy
imports and one-time library setup are not counted), takes a baseline, then builds the
contestant and trains ``--steps + 1`` units. Reported: peak growth over the baseline (CPU: peak
RSS from /proc/self/status VmHWM, reset at the baseline; CUDA: max_memory_allocated minus the
allocated bytes at the baseline) and its ratio to the hand-written loop's.

``looplib_fold`` runs ``ll.fold(step, state, units)`` over the units (fold copies the state it
is given once per call and donates the states it makes); ``looplib_donated`` donates the
contestant's own state on every ``Step.run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common as c  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    c.add_common_args(ap)
    ap.set_defaults(workloads="W2", steps=10)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps")
    args = ap.parse_args(argv)
    device = c.setup(args)
    workloads = c.parse_list(args.workloads, list(c.WORKLOADS), "workloads")
    default = c.default_contestants(c.MEMORY_DEFAULT, device, args.quick)
    names = c.parse_list(args.contestants or ",".join(default), c.CONTESTANTS, "contestants")
    steps = 2 if args.quick else args.steps

    info = c.machine()
    print(
        f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} thread(s)"
    )
    lines = [
        "| workload | contestant | peak growth (MiB) | ratio to hand | method |",
        "|---|---|---|---|---|",
    ]
    out = []
    for key in workloads:
        results = {}
        for name in [n for n in names if c.applicable(n, c.WORKLOADS[key])]:
            peak, method = c.measure_memory(key, name, args.device, steps, args.threads)
            results[name] = (peak, method)
            print(f"  {key} {name}: {c.fmt_mb(peak)} MiB ({method})", flush=True)
        hand = results.get("hand", (None, ""))[0]
        for name, (peak, method) in results.items():
            ratio = f"{peak / hand:.2f}x" if hand and peak is not None else "-"
            lines.append(f"| {key} | {name} | {c.fmt_mb(peak)} | {ratio} | {method} |")
            out.append({"workload": key, "contestant": name, "peak_bytes": peak, "note": method})
    print()
    print(f"- {steps} + 1 units per contestant; peak growth over a baseline taken after the data")
    print()
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
