"""Speed of looplib against a hand-written PyTorch loop and PyTorch Lightning.

    python benchmarks/bench_speed.py                 # the default run, CPU, 1 thread
    python benchmarks/bench_speed.py --quick         # a smoke run (~10 s; no compiling)
    python benchmarks/bench_speed.py --workloads W1,W3,W5 --contestants hand,looplib,looplib_compiled
    python benchmarks/bench_speed.py --device cuda --json out.json

For each workload: an equivalence check (parameters after a few units, against the hand-written
loop), then ``--repeats`` interleaved repeats of ``--steps`` timed units per contestant, then
(unless ``--no-memory`` or ``--quick``) the peak memory of each contestant in a fresh process.
See README.md for what every column means.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common as c  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    c.add_common_args(ap)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    ap.add_argument("--burn", type=int, default=None, help="untimed units before each repeat")
    ap.add_argument("--mem-steps", type=int, default=10, help="units run by the memory child")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, few steps")
    ap.add_argument(
        "--clock",
        choices=sorted(c.CLOCKS),
        default="wall",
        help="wall (default) or cpu: this process's CPU time, for a shared CPU machine "
        "(needs --threads 1 and --device cpu)",
    )
    args = ap.parse_args(argv)
    device = c.setup(args)
    if args.clock == "cpu" and (device.type != "cpu" or args.threads != 1):
        raise SystemExit("--clock cpu measures work only with --device cpu and --threads 1")
    c.set_clock(args.clock)
    workloads = c.parse_list(args.workloads, list(c.WORKLOADS), "workloads")
    # Compiling takes tens of seconds per workload on a small CPU: --quick leaves it out
    # unless it is asked for by name; CUDA graphs run on CUDA only; looplib_fold is timed only
    # when asked for (it is bench_memory.py's contestant).
    default = c.default_contestants(c.SPEED_DEFAULT, device, args.quick)
    names = c.parse_list(args.contestants or ",".join(default), c.CONTESTANTS, "contestants")
    repeats = 2 if args.quick else args.repeats
    with_memory = not (args.no_memory or args.quick)

    start = time.perf_counter()
    info = c.machine()
    print(
        f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
        f"{args.threads} thread(s), {args.clock} clock"
    )
    rows: list[c.Row] = []
    settings: dict[str, dict[str, int]] = {}
    for key in workloads:
        w = c.WORKLOADS[key]
        steps = args.steps or (c.QUICK_STEPS[key] if args.quick else w.steps)
        burn = args.burn if args.burn is not None else (2 if args.quick else w.burn)
        burn = max(burn, 1)
        settings[key] = {"repeats": repeats, "steps": steps, "burn": burn, "clock": args.clock}
        print(f"{key}: {w.title}; unit = {w.unit}; {repeats} x ({burn} burn-in + {steps} timed)")
        rows += c.time_workload(w, names, device, repeats, steps, burn)
    if with_memory:
        print("peak memory, one fresh process per contestant:")
        c.attach_memory(rows, args.device, args.mem_steps, args.threads)

    print()
    for key in workloads:
        print(f"- {key}: {c.WORKLOADS[key].title}; per {c.WORKLOADS[key].unit}")
    print()
    print(c.markdown(rows, with_memory))
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(c.to_json(rows, info, settings), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
