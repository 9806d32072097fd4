"""A long ``ll.fit`` run: does memory stay flat over many thousands of steps?

    python benchmarks/bench_load.py            # 160 epochs x 64 batches, a checkpoint every 250
    python benchmarks/bench_load.py --quick    # 12 epochs, a smoke run

A small MLP (BatchNorm, Dropout) trains with ``chain(accumulate(2), track_norm(), clip(1.0),
skip_nonfinite())`` and Adam on data reshuffled every epoch, validating every epoch and writing
rotating checkpoints every ``--checkpoint-every`` batches into a temporary directory. After each
epoch (``on_epoch_end``) it samples the process's resident set size (``/proc/self/statm``), the
number of Python objects the garbage collector tracks, the length of the history and the number
of checkpoint files. It prints the samples at the start, middle and end, the growth per 1000
batches (a least-squares slope over the second half of the run, after allocator warm-up), and
verdicts: memory flat, one history entry per epoch, rotation bounded. It is a report, not a test:
nothing raises on a bad verdict, the exit status is 0 either way.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import looplib as ll  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
FLAT_SLOPE = 256 * 1024
"""Bytes of resident memory per 1000 batches below which the run counts as flat (allocator noise
on this scale is a few hundred KiB)."""
FLAT_OBJECTS = 100
"""Reachable Python objects per 1000 batches below which the run counts as flat (one object kept
per batch would show as 1000)."""


def rss() -> int:
    """The resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def slope(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of ys over xs."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def build(batch_size: int, batches_per_epoch: int) -> tuple[Any, ...]:
    torch.manual_seed(0)
    features, classes = 32, 10
    n = batch_size * batches_per_epoch
    x = torch.randn(n, features)
    y = (x[:, :classes].argmax(1) + (torch.rand(n) < 0.1).long()) % classes
    val = [(x[i : i + 256] + 0.1, y[i : i + 256]) for i in range(0, 1024, 256)]
    model = nn.Sequential(
        nn.Linear(features, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, classes),
    )

    def loss_fn(m: nn.Module, batch: Any) -> Any:
        xb, yb = batch
        logits = m(xb)
        return F.cross_entropy(logits, yb), {"acc": (logits.argmax(1) == yb).float().mean()}

    def train_batches(epoch: int) -> list[Any]:
        order = torch.randperm(n)
        return [
            (x[order[i : i + batch_size]], y[order[i : i + batch_size]])
            for i in range(0, n, batch_size)
        ]

    opt = ll.optim.adam(1e-3)
    step = ll.chain(ll.accumulate(2), ll.track_norm(), ll.clip(1.0), ll.skip_nonfinite())(
        ll.train_step(model, loss_fn, opt)
    )
    return step, ll.init(model, opt), train_batches, val


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=160)
    ap.add_argument("--batches-per-epoch", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--checkpoint-every", type=int, default=250, help="batches between saves")
    ap.add_argument("--keep-last", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 12 epochs")
    args = ap.parse_args(argv)
    epochs = 12 if args.quick else args.epochs
    torch.set_num_threads(args.threads)

    step, state, train_batches, val = build(args.batch_size, args.batches_per_epoch)
    samples: list[dict[str, float]] = []

    with tempfile.TemporaryDirectory(prefix="bench-load-") as directory:
        ckpt = Path(directory)

        def sample(state: ll.TrainState, entry: dict[str, float]) -> None:
            gc.collect()  # count only what is still reachable: a leak, not garbage not yet freed
            samples.append(
                {
                    "epoch": entry["epoch"],
                    "batches": (entry["epoch"] + 1) * entry["batches"],
                    "rss": rss(),
                    "objects": len(gc.get_objects()),
                    "history": len(samples) + 1,  # entries so far, this one included
                    "files": len(list(ckpt.glob("ckpt-*.looplib.safetensors"))),
                }
            )

        gc.collect()
        start_rss, start_objects = rss(), len(gc.get_objects())
        started = time.perf_counter()
        result = ll.fit(
            step,
            state,
            train_batches,
            val,
            max_epochs=epochs,
            stop=None,
            progress=False,
            checkpoint_dir=ckpt,
            checkpoint_every_batches=args.checkpoint_every,
            keep_last=args.keep_last,
            keep_best=1,
            on_epoch_end=sample,
        )
        elapsed = time.perf_counter() - started
        final_files = sorted(p.name for p in ckpt.glob("ckpt-*.looplib.safetensors"))

    total_batches = epochs * args.batches_per_epoch
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(
        f"- {epochs} epochs x {args.batches_per_epoch} batches of {args.batch_size} = "
        f"{total_batches} batches, {int(result.state.step)} optimizer updates, "
        f"a checkpoint every {args.checkpoint_every} batches (keep_last={args.keep_last}, "
        f"keep_best=1); {elapsed:.1f} s, {1e3 * elapsed / total_batches:.2f} ms per batch "
        "(validation and checkpoints included)"
    )
    print(
        f"- final loss {result.history[-1]['loss']:.4f}, val_acc {result.history[-1]['val_acc']:.3f}"
    )
    print()
    print("| when | epoch | batches | RSS (MiB) | GC objects | history | checkpoint files |")
    print("|---|---|---|---|---|---|---|")
    print(f"| before fit | - | 0 | {start_rss / MIB:.1f} | {start_objects} | 0 | 0 |")
    picks = {"first epoch": 0, "middle": len(samples) // 2, "end": len(samples) - 1}
    for label, i in picks.items():
        s = samples[i]
        print(
            f"| {label} | {int(s['epoch'])} | {int(s['batches'])} | {s['rss'] / MIB:.1f} | "
            f"{int(s['objects'])} | {int(s['history'])} | {int(s['files'])} |"
        )
    half = samples[len(samples) // 2 :]
    xs = [s["batches"] / 1000 for s in half]
    rss_slope = slope(xs, [s["rss"] for s in half])
    obj_slope = slope(xs, [s["objects"] for s in half])
    print()
    print(
        f"- growth per 1000 batches over the second half: RSS {rss_slope / 1024:+.1f} KiB, "
        f"GC-tracked objects {obj_slope:+.1f}"
    )
    print(
        f"- RSS from the first epoch to the end: "
        f"{(samples[-1]['rss'] - samples[0]['rss']) / MIB:+.2f} MiB; "
        f"from the middle to the end: {(samples[-1]['rss'] - half[0]['rss']) / MIB:+.2f} MiB"
    )
    flat = abs(rss_slope) < FLAT_SLOPE and abs(obj_slope) < FLAT_OBJECTS
    one_per_epoch = len(result.history) == epochs and [s["epoch"] for s in samples] == list(
        range(epochs)
    )
    bounded = max(s["files"] for s in samples) <= args.keep_last + 1
    print(
        f"- memory flat (|RSS slope| < {FLAT_SLOPE // 1024} KiB and |objects slope| < {FLAT_OBJECTS} "
        "per 1000 "
        f"batches): {'yes' if flat else 'NO'}"
    )
    print(
        f"- one history entry per epoch ({len(result.history)} entries for {epochs} epochs, "
        f"one on_epoch_end per epoch, in order): {'yes' if one_per_epoch else 'NO'}"
    )
    print(
        f"- checkpoint files bounded by keep_last + keep_best = {args.keep_last + 1} "
        f"(max seen {int(max(s['files'] for s in samples))}, at the end {final_files}): "
        f"{'yes' if bounded else 'NO'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
