"""Where the eager looplib step spends its time, against the hand-written loop.

    python benchmarks/profile_looplib.py                  # W1 and W3, CPU, 1 thread
    python benchmarks/profile_looplib.py --workloads W1 --cprofile --torch-profiler

Three views, each per optimizer step (W3: per micro-batch call and per update):

1. pieces: median microseconds of each part of the step, timed in isolation on the same state
   and batch (``functional_call`` forward against a plain forward, ``autograd.grad`` against
   ``backward``, the pure Adam update against ``torch.optim.Adam.step``, the structure check,
   the metrics dict, ...);
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
    """Microseconds per call of each part of one looplib micro-step, and of the hand loop's."""
    dev = torch.device("cpu")
    p = c.make_problem(w, dev, pool_size=8)
    unit = p.pool[0]
    batch = unit[0] if w.micro > 1 else unit
    rows: list[tuple[str, float]] = []

    # Hand-written loop.
    model = p.fresh_model()
    adam = torch.optim.Adam(model.parameters(), lr=c.LR, foreach=True)
    params = list(model.parameters())

    def hand_fwd_bwd() -> None:
        c.mlp_loss(model, batch).backward()
        for q in params:
            q.grad = None

    def hand_fwd() -> None:
        c.mlp_loss(model, batch)

    def hand_unit() -> None:
        c.mlp_loss(model, batch).backward()
        adam.step()
        adam.zero_grad(set_to_none=True)

    rows.append(("hand: whole step (forward, backward, Adam, zero_grad)", us(hand_unit, number)))
    rows.append(("hand: forward (grad mode)", us(hand_fwd, number)))
    rows.append(("hand: forward + backward", us(hand_fwd_bwd, number)))
    c.mlp_loss(model, batch).backward()  # Adam skips parameters without a gradient
    rows.append(("hand: torch.optim.Adam(foreach).step", us(adam.step, number)))
    if w.clip is not None:
        rows.append(
            (
                "hand: clip_grad_norm_ (returns total norm)",
                us(lambda: torch.nn.utils.clip_grad_norm_(params, w.clip), number),
            )
        )
    rows.append(("hand: zero_grad(set_to_none=True)", us(adam.zero_grad, number)))

    # looplib.
    model = p.fresh_model()
    opt = ll.optim.adam(lr=c.LR)
    step = c.looplib_step(p, model, opt)
    base = ll.train_step(model, c.mlp_loss, opt)
    state = step(step(ll.init(model, opt), batch), batch)
    start = step.init(state)
    rows.append(("looplib: whole step(state, batch)", us(lambda: step(state, batch), number)))
    rows.append(
        (
            "looplib: step.gradient (fwd + bwd + metrics)",
            us(lambda: step.gradient(start, batch), number),
        )
    )

    leaves = [q.detach().requires_grad_(True) for q in start.params.values()]
    rows.append(
        (
            "  detach().requires_grad_() of the params",
            us(lambda: [q.detach().requires_grad_(True) for q in start.params.values()], number),
        )
    )
    tensors = dict(zip(step._names, leaves, strict=True))

    def fc_forward() -> Any:
        with torch.enable_grad():
            return torch.func.functional_call(
                step._bound, tensors, (batch, ll._step.NO_CARRY), strict=True
            )

    def plain_forward() -> Any:
        with torch.enable_grad():
            return c.mlp_loss(model, batch)

    rows.append(("  functional_call forward", us(fc_forward, number)))
    rows.append(("  plain forward of the template (same module)", us(plain_forward, number)))
    fc = torch.func.functional_call
    args = (batch, ll._step.NO_CARRY)
    rows.append(
        (
            "    alt: functional_call(strict=False)",
            us(lambda: fc(step._bound, tensors, args), number),
        )
    )
    rows.append(
        (
            "    alt: functional_call(strict=True, tie_weights=False)",
            us(lambda: fc(step._bound, tensors, args, strict=True, tie_weights=False), number),
        )
    )
    rows.append(
        (
            "    alt: functional_call(strict=False, tie_weights=False)",
            us(lambda: fc(step._bound, tensors, args, tie_weights=False), number),
        )
    )
    slots = []
    for name in step._names:
        *path, attr = name.split(".")
        mod = step._bound
        for part in path:
            mod = getattr(mod, part)
        slots.append((mod, attr, getattr(mod, attr)))

    def swap_forward() -> Any:
        # Precomputed (module, name) slots: swap the leaves in, run, swap the originals back.
        for (mod, attr, _), leaf in zip(slots, leaves, strict=True):
            mod._parameters[attr] = leaf
        try:
            with torch.enable_grad():
                return step._bound(*args)
        finally:
            for mod, attr, orig in slots:
                mod._parameters[attr] = orig

    rows.append(("    alt: cached _parameters swap, no checks", us(swap_forward, number)))

    def fc_grad() -> Any:
        return torch.autograd.grad(fc_forward(), leaves, allow_unused=True, materialize_grads=True)

    rows.append(("  functional_call forward + autograd.grad", us(fc_grad, number)))
    out = ll._step._as_loss_output(fc_forward())
    rows.append(("  _as_loss_output", us(lambda: ll._step._as_loss_output(out.loss), number)))
    rows.append(
        (
            "  _metrics (sample_count, weight tensor, dict)",
            us(lambda: step._metrics(out, batch), number),
        )
    )
    rows.append(("    sample_count(batch)", us(lambda: ll.sample_count(batch), number)))
    rows.append(("    torch.tensor(float(n))", us(lambda: torch.tensor(32.0), number)))

    grads = step.gradient(start, batch).grads
    rows.append(
        (
            "looplib: opt.update (pure Adam)",
            us(lambda: opt.update(grads, start.opt_state, start.params), number),
        )
    )
    count = start.opt_state.count
    p0 = next(iter(start.params.values()))

    def adam_scalars() -> Any:
        t = (count + 1).to(device=p0.device, dtype=torch.float32)
        bc1 = 1 - torch.pow(0.9, t)
        bc2 = 1 - torch.pow(0.999, t)
        return torch.sqrt(bc2), c.LR / bc1, count + 1

    rows.append(("  of which bias-correction scalars as tensors", us(adam_scalars, number)))
    rows.append(("  of which _groups(params)", us(lambda: ll.optim._groups(start.params), number)))
    rows.append(("looplib: step.init(state)", us(lambda: step.init(state), number)))
    new = step(state, batch)
    rows.append(("looplib: _check(before, after)", us(lambda: step._check(start, new), number)))
    rows.append(
        (
            "  of which optree.tree_structure(state)",
            us(
                lambda: ll._tree.optree.tree_structure(
                    ll._tree.without_metrics(new), none_is_leaf=True
                ),
                number,
            ),
        )
    )
    rows.append(("looplib: after(state) host checks", us(lambda: step.after(new), number)))
    rows.append(("looplib: state.step + 1", us(lambda: start.step + 1, number)))
    if w.micro > 1:
        k = w.micro
        g, wt = grads, torch.tensor(32.0)
        rows.append(
            (
                "looplib: the stages' apply (accumulate, track_norm, clip, Adam) per micro-batch",
                us(lambda: step.apply(start, g, wt), number),
            )
        )
        rows.append(
            (
                "  track_norm + clip: two _foreach_norm + stack + vector_norm",
                us(lambda: ll.clip_by_global_norm(g, 1.0), number) * 2,
            )
        )
        rows.append(
            (
                "  accumulate: _foreach_mul + _foreach_add + 2 scalar adds",
                us(
                    lambda: (
                        torch._foreach_add(
                            list(g.values()), torch._foreach_mul(list(g.values()), wt)
                        ),
                        count + 1,
                        wt + wt,
                    ),
                    number,
                ),
            )
        )
        full = torch.tensor(True)
        rows.append(("  accumulate: bool(full) host branch", us(lambda: bool(full), number)))
        base_state = base(ll.init(model, opt), batch)
        rows.append(
            (
                f"looplib: unwrapped train_step (k={k} uses it 1/{k} of the calls)",
                us(lambda: base(base_state, batch), number),
            )
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
