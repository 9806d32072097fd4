"""Where the eager looplib step spends its time, against the hand-written loop.

    python benchmarks/profile_looplib.py                  # W1 and W3, CPU, 1 thread
    python benchmarks/profile_looplib.py --workloads W1 --cprofile --torch-profiler

Three views, each per unit (one update; W3: 4 micro-batches):

1. pieces: the fastest mean microseconds of each part of a unit, timed in isolation on the same
   state and batch: the unit as the benchmark drives it (``Step.run(state, batches, 0)``) and
   the other ways to call a step (donated, ``start=None``, ``step(state, batch)`` per
   micro-batch, ``ll.fold`` per unit), then the pieces of one micro-batch (``gradient``, the
   stages' ``apply``, the pure Adam against ``torch.optim.Adam.step``, ...). Parts timed alone
   run warmer than inside a whole unit, so they rank costs rather than add up;
2. ``--cprofile``: the Python functions with the most own time, per step;
3. ``--torch-profiler``: the operators with the most self CPU time, per step, and how many
   operator calls each step makes.

The pieces reach into looplib's private methods on purpose (this script measures, it is not an
example of the API) and may need updating when those change.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import looplib as ll  # noqa: E402
from benchmarks import common as c  # noqa: E402


def us(fn: Callable[[], Any], number: int, repeats: int = 15) -> float:
    """Fastest over ``repeats`` of the mean microseconds per call of ``fn`` (``number`` calls):
    the least disturbed estimate of a piece's cost on a shared machine. With one thread the
    clock is this process's CPU time, which other processes on the machine do not inflate."""
    now = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    fn()
    out = []
    for _ in range(repeats):
        t0 = now()
        for _ in range(number):
            fn()
        out.append((now() - t0) / number * 1e6)
    return min(out)


def pieces(w: c.Workload, number: int) -> list[tuple[str, float]]:
    """Microseconds per call of each part of one looplib unit, and of the hand loop's."""
    dev = torch.device("cpu")
    p = c.make_problem(w, dev, pool_size=8)
    unit = p.pool[0]
    batches = c.unit_batches(w, unit)
    batch = batches[0]
    rows: list[tuple[str, float]] = []

    # Hand-written loop.
    hand = c.build_hand(p)
    model = p.fresh_model()
    adam = torch.optim.Adam(model.parameters(), lr=c.LR, foreach=True)
    params = list(model.parameters())

    def hand_fwd_bwd() -> None:
        c.mlp_loss(model, batch).backward()
        for q in params:
            q.grad = None

    rows.append(("hand: whole unit", us(lambda: hand.do_unit(unit), number)))
    rows.append(("hand: forward", us(lambda: c.mlp_loss(model, batch), number)))
    rows.append(("hand: forward + backward (one micro-batch)", us(hand_fwd_bwd, number)))
    c.mlp_loss(model, batch).backward()  # Adam skips parameters without a gradient
    rows.append(("hand: torch.optim.Adam(foreach).step", us(adam.step, number)))
    if w.clip is not None:
        rows.append(
            (
                "hand: clip_grad_norm_ (returns total norm)",
                us(lambda: torch.nn.utils.clip_grad_norm_(params, w.clip), number),
            )
        )

    # looplib: the whole unit, as the benchmark drives it, and the other ways to call a step.
    opt = ll.optim.adam(lr=c.LR)
    step = c.looplib_step(p, p.fresh_model(), opt)
    state = c.looplib_state(p, step, opt)
    owned = [ll._fold.own(state)]

    def donated() -> None:
        owned[0] = step.run(owned[0], batches, 0, donate=True)

    rows.append(
        (
            "looplib: step.run(state, batches, 0) (the benchmark's unit)",
            us(lambda: step.run(state, batches, 0), number),
        )
    )
    rows.append(("looplib: step.run(..., donate=True)", us(donated, number)))
    rows.append(
        (
            "looplib: step.run(state, batches) (start=None: window by select)",
            us(lambda: step.run(state, batches), number),
        )
    )
    rows.append(
        (
            "looplib: step(state, b) per micro-batch (init + checks each call)",
            us(lambda: [step(state, b) for b in batches], number),
        )
    )
    rows.append(
        (
            "looplib: ll.fold(step, state, batches) (one unit per call)",
            us(lambda: ll.fold(step, state, batches), number),
        )
    )

    # The pieces of one micro-batch.
    out = step.gradient(state, batch)
    rows.append(
        (
            "looplib: step.gradient (swap, fwd, autograd.grad, metrics)",
            us(lambda: step.gradient(state, batch), number),
        )
    )
    plist = list(state.params.values())
    blist = list(state.buffers.values())
    key = state.slots["rng"]
    noc = ll._step.NO_CARRY
    rows.append(
        (
            "  step.forward, no grad (Swapper + loss)",
            us(lambda: step.forward(plist, blist, key, batch, noc, grad=False), number),
        )
    )
    rows.append(
        (
            "  detach().requires_grad_() of the params",
            us(lambda: [q.detach().requires_grad_(True) for q in plist], number),
        )
    )
    rows.append(
        (
            "  step._metrics (weight, dict)",
            us(lambda: step._metrics(ll._step.LossOutput(out.metrics["loss"]), batch), number),
        )
    )
    rows.append(
        ("  rng key advance (every micro-batch)", us(lambda: ll._random.advance(key), number))
    )
    micro = ll._step.Micro(out.grads, out.weight, out.metrics, 0, False)
    rows.append(
        (
            "looplib: step.apply (stages + optimizer), window position 0",
            us(lambda: step.apply(state, micro), number),
        )
    )
    if w.micro > 1:
        last = micro._replace(position=w.micro - 1)
        rows.append(
            (
                f"looplib: step.apply, position {w.micro - 1} (closes the window)",
                us(lambda: step.apply(state, last), number),
            )
        )
        rows.append(
            (
                "  clip_by_global_norm (one norm)",
                us(lambda: ll.clip_by_global_norm(out.grads, 1.0), number),
            )
        )
    rows.append(
        (
            "  opt.update (pure Adam)",
            us(lambda: opt.update(out.grads, state.opt_state, state.params), number),
        )
    )
    work = ll._fold.own(state)
    rows.append(
        (
            "  opt.update_ (in place, donated)",
            us(lambda: opt.update_(out.grads, work.opt_state, work.params), number),
        )
    )
    rows.append(
        (
            "  opt.hyperparams (lr reported every update)",
            us(lambda: opt.hyperparams(state.opt_state), number),
        )
    )
    rows.append(
        (
            "looplib: step.check_structure(state) (cached)",
            us(lambda: step.check_structure(state), number),
        )
    )
    rows.append(
        ("looplib: step.init(state) (complete: no probe)", us(lambda: step.init(state), number))
    )
    rows.append(
        ("looplib: ll._fold.own(state) (fold's copy)", us(lambda: ll._fold.own(state), number))
    )
    return rows


def top_cprofile(step_fn: Callable[[], None], n: int, limit: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step_fn()
    prof.disable()
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s)
    stats.sort_stats("tottime").print_stats(limit)
    return s.getvalue()


def top_ops(step_fn: Callable[[], None], n: int, limit: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        step_fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step_fn()
    events = prof.key_averages()
    calls = sum(e.count for e in events if not e.key.startswith("ProfilerStep"))
    table = events.table(sort_by="self_cpu_time_total", row_limit=limit)
    return f"{calls / n:.0f} profiled operator calls per step\n{table}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="W1,W3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--number", type=int, default=200, help="calls per timing")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--torch-profiler", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for key in c.parse_list(args.workloads, ["W1", "W2", "W3"], "workloads"):
        w = c.WORKLOADS[key]
        print(f"\n## {key}: {w.title} (microseconds per call, fastest of 15 batches)\n")
        print("| piece | us |\n|---|---|")
        for name, t in pieces(w, args.number):
            print(f"| {name} | {t:.1f} |")
        p = c.make_problem(w, torch.device("cpu"), pool_size=8)
        for label, build in (("hand", c.build_hand), ("looplib", c.build_looplib)):
            # do_unit is the benchmark's unit: Step.run(state, batches, start=0).
            runner = build(p)
            units = iter(p.units(10**6))

            def one(runner: Any = runner, units: Any = units) -> None:
                runner.do_unit(next(units))

            for _ in range(20):
                one()
            if args.cprofile:
                print(f"\n### cProfile, {label}, {key}: 300 units, by own time\n```")
                print(top_cprofile(one, 300, 18))
                print("```")
            if args.torch_profiler:
                print(f"\n### torch.profiler, {label}, {key}: 100 units\n```")
                print(top_ops(one, 100, 15))
                print("```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
