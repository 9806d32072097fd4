"""Data-parallel scaling: samples/s of ``pmean`` training on 1 process and on N processes.

Launch with torchrun (one process per GPU, or N CPU processes)::

    torchrun --nproc_per_node=2 benchmarks/bench_scaling.py              # NCCL on 2 GPUs
    torchrun --nproc_per_node=2 benchmarks/bench_scaling.py --steps 5 --device cpu   # gloo

Each rank trains an MLP with Adam on its own synthetic batches of ``--batch`` samples (weak
scaling: the global batch grows with N). For every model the table shows:

* ``looplib`` on 1 process (rank 0 alone while the others wait) and on N processes with
  ``chain(pmean())``, in samples/s over all ranks;
* the hand-written reference, a plain ``torch.optim.Adam`` loop on 1 process and
  ``DistributedDataParallel`` on N, on the same batches from the same start;
* speedup (N-process samples/s over 1-process samples/s) and efficiency (speedup / N).

``--overlap`` (the default) runs ``pmean(bucket_mb=...)`` with its all-reduce overlapped with
the backward pass (buckets launched from grad hooks, as DDP does); ``--no-overlap`` runs
``pmean(overlap=False)``, one all-reduce once the whole gradient exists. ``--timeline N`` then
records N more steps of the N-process looplib run: when each bucket's ``all_reduce`` was
launched, relative to when ``torch.autograd.grad`` was entered and returned (rank 0 prints it).

Each measurement is: burn-in steps, synchronise, time ``--steps`` steps, synchronise; the N-process
time is the slowest rank's. A process uses one GPU (``LOCAL_RANK``), or on CPU
``cpu_count // LOCAL_WORLD_SIZE`` threads, in both the 1-process and the N-process runs. At the
end every rank checks that its looplib parameters are bit-for-bit those of the other ranks
(``check_same_state``) and reports how far they are from the reference's. That distance is a
rough sanity check only: Adam's normalised steps amplify float32 rounding differences, so it
grows with the number of steps even between two correct implementations (it is as large
between the two 1-process runs); exactness is tested in float64 by tests/test_distributed.py.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

try:
    import looplib as ll
except ImportError:  # run from a checkout: benchmarks/ sits next to looplib/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import looplib as ll

from looplib._distributed import (
    agree,
    all_reduce_metrics,
    broadcast_state,
    check_same_state,
    pmean,
)

MODELS = {
    "w2": [784, 1024, 1024, 10],
    "large": [784, 4096, 4096, 4096, 10],
}
POOL = 32  # distinct synthetic batches per rank (random labels), cycled


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="burn-in steps before timing")
    parser.add_argument("--batch", type=int, default=256, help="samples per rank per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--models", default="w2,large", help=f"comma-separated, from {sorted(MODELS)}"
    )
    parser.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="overlap pmean's all-reduce with the backward pass (default: on)",
    )
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="pmean(bucket_mb=...)")
    parser.add_argument(
        "--timeline", type=int, default=0, help="steps whose all-reduce launches to record"
    )
    args = parser.parse_args()
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"--models: unknown model {name!r}; choose from {sorted(MODELS)}")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.timeline < 0:
        parser.error("--steps and --batch must be positive, --warmup and --timeline non-negative")
    if not args.bucket_mb > 0:
        parser.error("--bucket-mb must be positive")
    return args


def setup(choice: str) -> tuple[int, int, torch.device, str]:
    """Join the process group torchrun describes (if any); returns rank, world, device, backend."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    use_cuda = torch.cuda.is_available() if choice == "auto" else choice == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1:
        extra: dict[str, Any] = {"device_id": device} if use_cuda else {}
        # An explicit timeout: a rank that dies makes the others fail instead of hang.
        dist.init_process_group(backend, timeout=timedelta(minutes=10), **extra)
    return rank, world_size, device, backend


def make_model(sizes: list[int], device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(device)


def make_batches(rank: int, batch: int, device: torch.device) -> list[tuple[Any, Any]]:
    gen = torch.Generator().manual_seed(1000 + rank)
    return [
        (
            torch.randn(batch, 784, generator=gen).to(device),
            torch.randint(0, 10, (batch,), generator=gen).to(device),
        )
        for _ in range(POOL)
    ]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run_one: Any, state: Any, batches: list[Any], args: argparse.Namespace, device) -> Any:
    """Burn in, then time ``args.steps`` steps; returns (state, seconds)."""
    for i in range(args.warmup):
        state = run_one(state, batches[i % POOL])
    sync(device)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        state = run_one(state, batches[i % POOL])
    sync(device)
    return state, time.perf_counter() - start


def looplib_step(model: nn.Module, args: argparse.Namespace, distributed: bool) -> ll.Step:
    base = ll.train_step(model, loss_fn, ll.optim.adam(lr=args.lr))
    if not distributed:
        return base
    return ll.chain(pmean(bucket_mb=args.bucket_mb, overlap=args.overlap))(base)


def looplib_run(model: nn.Module, args, batches, device, distributed: bool):
    step = looplib_step(model, args, distributed)
    state = ll.init(model, step.opt)
    if distributed:
        state = broadcast_state(state)
    return timed(step, state, batches, args, device)


def timeline(model: nn.Module, args, batches, device) -> list[str]:
    """Record ``args.timeline`` steps of the distributed looplib step: every all-reduce's
    launch and every backward pass's start and end (``time.perf_counter``, this rank)."""
    step = looplib_step(model, args, True)
    state = broadcast_state(ll.init(model, step.opt))
    state = step(state, batches[0])  # warm
    reduces: list[tuple[float, bool]] = []
    backwards: list[tuple[float, float]] = []
    all_reduce, grad = dist.all_reduce, torch.autograd.grad

    def recorded_all_reduce(*a: Any, **k: Any) -> Any:
        reduces.append((time.perf_counter(), bool(k.get("async_op", False))))
        return all_reduce(*a, **k)

    def recorded_grad(*a: Any, **k: Any) -> Any:
        entered = time.perf_counter()
        out = grad(*a, **k)
        sync(device)
        backwards.append((entered, time.perf_counter()))
        return out

    dist.all_reduce, torch.autograd.grad = recorded_all_reduce, recorded_grad  # type: ignore
    try:
        for i in range(args.timeline):
            state = step(state, batches[(i + 1) % POOL])
        sync(device)
    finally:
        dist.all_reduce, torch.autograd.grad = all_reduce, grad  # type: ignore
    per_step = len(reduces) // max(1, len(backwards))
    lines = []
    for i, (entered, returned) in enumerate(backwards):
        mine = reduces[i * per_step : (i + 1) * per_step]
        offsets = " ".join(f"{1e3 * (t - entered):.1f}" for t, _ in mine)
        inside = sum(entered < t < returned for t, _ in mine)
        lines.append(
            f"  step {i}: backward {1e3 * (returned - entered):.1f} ms; {len(mine)} all_reduce "
            f"({'async' if all(a for _, a in mine) else 'blocking'}) launched at +[{offsets}] "
            f"ms; {inside}/{len(mine)} before the backward returned"
        )
    return lines


def torch_run(model: nn.Module, args, batches, device, distributed: bool):
    net = copy.deepcopy(model)
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)

    def run_one(_: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net, batch).backward()
        opt.step()

    _, seconds = timed(run_one, None, batches, args, device)
    module: nn.Module = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
    return {name: p.detach() for name, p in module.named_parameters()}, seconds


def gap(state: ll.TrainState, params: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between looplib's and the reference's parameters."""
    return max(float((state.params[k] - params[k]).abs().max()) for k in state.params)


def slowest(seconds: float, device: torch.device, world_size: int) -> float:
    if world_size == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def main() -> None:
    args = parse()
    rank, world_size, device, backend = setup(args.device)
    rows: list[tuple[Any, ...]] = []
    checks: list[str] = []
    for name in args.models.split(","):
        model = make_model(MODELS[name], device)
        n_params = sum(p.numel() for p in model.parameters())
        batches = make_batches(rank, args.batch, device)
        single: dict[str, float] = {}
        # 1 process: rank 0 alone, the others wait at the barrier.
        if rank == 0:
            alone, single["looplib"] = looplib_run(model, args, batches, device, False)
            reference, single["torch"] = torch_run(model, args, batches, device, False)
            checks.append(f"{name}: 1 process, max |looplib - torch| = {gap(alone, reference):.2e}")
        if world_size > 1:
            dist.barrier()
        for impl in ("looplib", "torch"):
            if rank == 0:
                rate = args.batch * args.steps / single[impl]
                rows.append((name, n_params, impl, 1, single[impl] / args.steps, rate, 1.0, 1.0))
        if world_size == 1:
            continue
        state, ours = looplib_run(model, args, batches, device, distributed=True)
        ddp_params, theirs = torch_run(model, args, batches, device, distributed=True)
        if args.timeline:
            checks.append(f"{name}: launch timeline (rank {rank}), offsets from backward start:")
            checks.extend(timeline(model, args, batches, device))
        check_same_state(state)  # raises on every rank if any rank's params differ
        weight = state.metrics["weight"]
        mean = all_reduce_metrics({"loss": state.metrics["loss"] * weight}, weight)["loss"]
        stop = agree(not math.isfinite(mean))
        checks.append(
            f"{name}: {world_size} processes, looplib params identical on every rank; "
            f"max |looplib - DDP| = {gap(state, ddp_params):.2e}; last loss, mean over ranks "
            f"{mean:.4g}{' (not finite)' if stop else ''}"
        )
        for impl, seconds in (("looplib", ours), ("torch", theirs)):
            seconds = slowest(seconds, device, world_size)
            if rank == 0:
                rate = world_size * args.batch * args.steps / seconds
                speedup = rate / (args.batch * args.steps / single[impl])
                rows.append(
                    (
                        name,
                        n_params,
                        impl + ("+pmean" if impl == "looplib" else "+DDP"),
                        world_size,
                        seconds / args.steps,
                        rate,
                        speedup,
                        speedup / world_size,
                    )
                )
    if rank == 0:
        threads = torch.get_num_threads()
        where = f"{device}" if device.type == "cuda" else f"cpu, {threads} threads/process"
        print(
            f"\nbench_scaling: backend={backend if world_size > 1 else 'none'} ({where}), "
            f"batch {args.batch}/rank, Adam, {args.warmup} burn-in + {args.steps} timed steps; "
            + (f"pmean(bucket_mb={args.bucket_mb:g})" if args.overlap else "pmean(overlap=False)")
        )
        header = (
            f"{'model':<6} {'params':>10} {'impl':<14} {'procs':>5} {'step ms':>9} "
            f"{'samples/s':>11} {'speedup':>8} {'effic.':>7}"
        )
        print(header)
        print("-" * len(header))
        for model_name, n, impl, procs, step_s, rate, speedup, eff in rows:
            print(
                f"{model_name:<6} {n:>10,} {impl:<14} {procs:>5} {1e3 * step_s:>9.2f} "
                f"{rate:>11,.0f} {speedup:>8.2f} {eff:>7.2f}"
            )
        for line in checks:
            print(line)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
