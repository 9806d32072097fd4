"""Schedules: ``torch.optim.lr_scheduler`` (and nanoGPT's ``get_lr``) as the oracles, update by
update; the laws of ``join``; ``torch.compile(fullgraph=True)`` and ``torch.func.vmap``; the
argument errors, pinned."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.optim import lr_scheduler as lrs

import looplib as ll
from looplib import schedules as S

# --------------------------------------------------------------------------- oracle helpers


def torch_lrs(make: Callable[[torch.optim.Optimizer], object], lr: float, n: int) -> list[float]:
    """The learning rate of each of ``torch.optim.SGD``'s first ``n`` steps (t = 0 .. n-1)
    under the scheduler ``make(optimizer)``: read before ``optimizer.step()``, and
    ``scheduler.step()`` after it, as torch's documentation prescribes."""
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=lr)
    scheduler = make(opt)
    out = []
    for t in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if t < n - 1:  # not past the last step: OneCycleLR raises (or divides by 0) there
            scheduler.step()  # type: ignore[attr-defined]
    return out


def ours(schedule: S.Schedule, n: int) -> list[float]:
    """``schedule`` at the counts 0 .. n-1, each a 0-d int64 tensor as the optimizer passes it."""
    values = [schedule(torch.tensor(t)) for t in range(n)]
    assert all(isinstance(x, torch.Tensor) and x.dtype == torch.float64 for x in values)
    return [float(x) for x in values]


def assert_matches(got: list[float], want: list[float], scale: float) -> None:
    """Equal within 1e-12 relative, or within 1e-14 of the schedule's scale (its largest value).

    torch's schedulers are recursive (each lr is the previous one times a factor), so they round
    once per step where ours are closed forms: about t * 2**-53 relative, under 3e-14 for 200
    steps. Where the value should be exactly 0 (``LinearLR`` with ``end_factor=0``) the
    recursion leaves a residue of about 1e-16 of the base lr (of either sign), which no
    relative tolerance accepts; hence the absolute floor, far below any learning rate that
    matters.
    """
    assert len(got) == len(want)
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-14 * scale), f"t={t}: {a!r} != {b!r}"


LR = st.floats(1e-4, 10.0)
FACTOR = st.floats(0.5, 1.0)  # a gamma; 200 steps of 0.5 still stay far from underflow
STEPS = st.integers(1, 150)
EXTRA = st.integers(0, 50)


# --------------------------------------------------------------------------- oracles


@given(value=LR, n=st.integers(1, 50))
def test_constant_equals_constant_lr(value: float, n: int) -> None:
    want = torch_lrs(lambda o: lrs.ConstantLR(o, factor=1.0, total_iters=n // 2), value, n)
    assert ours(S.constant(value), n) == want


@given(base=LR, start=st.floats(1e-3, 1.0), stop=st.floats(0.0, 1.0), steps=STEPS, extra=EXTRA)
def test_linear_equals_linear_lr(
    base: float, start: float, stop: float, steps: int, extra: int
) -> None:
    n = steps + 1 + extra
    want = torch_lrs(lambda o: lrs.LinearLR(o, start, stop, total_iters=steps), base, n)
    assert_matches(ours(S.linear(base * start, base * stop, steps), n), want, base)


@given(base=LR, frac=st.sampled_from([0.0, 0.1, 0.5, 1.5]), steps=STEPS)
def test_cosine_decay_equals_cosine_annealing_lr_up_to_steps(
    base: float, frac: float, steps: int
) -> None:
    # Only t <= steps: CosineAnnealingLR then follows the cosine back up, we hold `end`.
    end = base * frac
    want = torch_lrs(lambda o: lrs.CosineAnnealingLR(o, T_max=steps, eta_min=end), base, steps + 1)
    assert_matches(ours(S.cosine_decay(base, steps, end), steps + 1), want, max(base, end))


@given(base=LR, gamma=st.floats(0.5, 1.05), n=st.integers(1, 200))
def test_exponential_equals_exponential_lr(base: float, gamma: float, n: int) -> None:
    want = torch_lrs(lambda o: lrs.ExponentialLR(o, gamma), base, n)
    assert_matches(ours(S.exponential(base, gamma), n), want, base)


@given(
    base=LR,
    milestones=st.lists(st.integers(1, 150), max_size=5, unique=True).map(sorted),
    gamma=FACTOR,
    n=st.integers(1, 200),
)
def test_multistep_equals_multistep_lr_bit_for_bit(
    base: float, milestones: list[int], gamma: float, n: int
) -> None:
    want = torch_lrs(lambda o: lrs.MultiStepLR(o, milestones, gamma), base, n)
    assert ours(S.multistep(base, milestones, gamma), n) == want


@given(base=LR, step_size=st.integers(1, 40), gamma=FACTOR, n=st.integers(1, 200))
def test_step_decay_equals_step_lr(base: float, step_size: int, gamma: float, n: int) -> None:
    want = torch_lrs(lambda o: lrs.StepLR(o, step_size, gamma), base, n)
    assert_matches(ours(S.step_decay(base, step_size, gamma), n), want, base)


def nanogpt_get_lr(
    it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float
) -> float:
    """``get_lr`` of karpathy/nanoGPT's ``train.py`` (as of its last commit, 2025), verbatim
    but for the globals made arguments."""
    # 1) linear warmup for warmup_iters steps
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) if it > lr_decay_iters, return min learning rate
    if it > lr_decay_iters:
        return min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)


@given(
    peak=LR,
    warmup=st.integers(0, 60),
    decay=st.integers(1, 140),
    min_frac=st.sampled_from([0.0, 0.1]),
    extra=EXTRA,
)
def test_warmup_cosine_equals_nanogpt_get_lr(
    peak: float, warmup: int, decay: int, min_frac: float, extra: int
) -> None:
    decay_steps, end = warmup + decay, peak * min_frac
    n = decay_steps + 1 + extra
    got = ours(S.warmup_cosine(peak, warmup, decay_steps, end), n)
    want = [nanogpt_get_lr(t, peak, warmup, decay_steps, end) for t in range(n)]
    # The same expressions in the same order: the warmup is bit for bit; the cosine differs
    # only where torch.cos and math.cos round differently (an ulp, rarely).
    assert got[:warmup] == want[:warmup]
    assert_matches(got, want, peak)


@given(peak=LR, init_frac=st.floats(0.0, 1.0), warmup=st.integers(1, 60), decay=STEPS)
def test_join_of_linear_and_cosine_is_the_optax_warmup(
    peak: float, init_frac: float, warmup: int, decay: int
) -> None:
    # The alternative warmup_cosine's docstring gives for a warmup that starts at `init` on
    # count 0: optax's warmup_cosine_decay_schedule, and nanoGPT's get_lr before December 2024.
    init, end = peak * init_frac, peak / 10
    s = S.join([S.linear(init, peak, warmup), S.cosine_decay(peak, decay, end)], [warmup])
    n = warmup + decay + 10
    want = [
        init + (peak - init) * t / warmup
        if t < warmup
        else nanogpt_get_lr(t, peak, warmup, warmup + decay, end)
        for t in range(n)
    ]
    assert_matches(ours(s, n), want, peak)


one_cycle_args = st.fixed_dictionaries(
    {
        "max_lr": LR,
        "total_steps": st.integers(1, 200),
        "pct_start": st.one_of(st.sampled_from([0.0, 0.3, 0.5, 1.0]), st.floats(0.0, 1.0)),
        "anneal_strategy": st.sampled_from(["cos", "linear"]),
        "div_factor": st.floats(1.0, 100.0),
        "final_div_factor": st.floats(1.0, 1e4),
        "three_phase": st.booleans(),
    }
)


@given(args=one_cycle_args)
def test_one_cycle_equals_one_cycle_lr(args: dict) -> None:
    assume(not (args["three_phase"] and args["pct_start"] > 0.5))
    # OneCycleLR divides 0 by 0 there; test_one_cycle_where_torch_divides_by_zero covers it.
    assume(float(args["pct_start"] * args["total_steps"]) != 1.0)
    n = args["total_steps"]
    want = torch_lrs(lambda o: lrs.OneCycleLR(o, cycle_momentum=False, **args), 1.0, n)
    assert_matches(ours(S.one_cycle(**args), n), want, args["max_lr"])


def test_one_cycle_where_torch_divides_by_zero() -> None:
    # pct_start * total_steps == 1 makes OneCycleLR's first phase the single count 0, and its
    # pct 0 / 0. Ours gives that phase's start, max_lr / div_factor, and agrees elsewhere.
    make = lambda o: lrs.OneCycleLR(o, max_lr=1.0, total_steps=10, pct_start=0.1)  # noqa: E731
    with pytest.raises(ZeroDivisionError):
        torch_lrs(make, 1.0, 1)
    s = S.one_cycle(1.0, total_steps=10, pct_start=0.1)
    # From count 1 on, OneCycleLR's second phase (from e1 = 0 to e2 = 9) is well defined.
    lo, floor = 1.0 / 25.0, 1.0 / 25.0 / 1e4
    for t in range(1, 10):
        pct = (t - 0.0) / (9.0 - 0.0)
        want = floor + (1.0 - floor) / 2.0 * (math.cos(math.pi * pct) + 1)
        assert math.isclose(float(s(t)), want, rel_tol=1e-12)
    assert math.isclose(float(s(0)), lo, rel_tol=1e-15)


# --------------------------------------------------------------------------- join


@given(
    peak=LR,
    start=st.floats(1e-3, 1.0),
    warmup=st.integers(1, 50),
    gamma=st.floats(0.8, 1.0),
    extra=st.integers(1, 100),
)
def test_join_equals_sequential_lr_warmup_then_exponential(
    peak: float, start: float, warmup: int, gamma: float, extra: int
) -> None:
    n = warmup + extra
    want = torch_lrs(
        lambda o: lrs.SequentialLR(
            o, [lrs.LinearLR(o, start, 1.0, warmup), lrs.ExponentialLR(o, gamma)], [warmup]
        ),
        peak,
        n,
    )
    s = S.join([S.linear(peak * start, peak, warmup), S.exponential(peak, gamma)], [warmup])
    assert_matches(ours(s, n), want, peak)


@given(
    peak=LR,
    start=st.floats(1e-3, 1.0),
    warmup=st.integers(1, 50),
    steps=STEPS,
    min_frac=st.sampled_from([0.0, 0.1]),
)
def test_join_equals_sequential_lr_warmup_then_cosine(
    peak: float, start: float, warmup: int, steps: int, min_frac: float
) -> None:
    n = warmup + steps + 1  # CosineAnnealingLR cycles back up after that; we hold `end`
    end = peak * min_frac
    want = torch_lrs(
        lambda o: lrs.SequentialLR(
            o,
            [lrs.LinearLR(o, start, 1.0, warmup), lrs.CosineAnnealingLR(o, steps, end)],
            [warmup],
        ),
        peak,
        n,
    )
    s = S.join([S.linear(peak * start, peak, warmup), S.cosine_decay(peak, steps, end)], [warmup])
    assert_matches(ours(s, n), want, peak)


@given(
    peak=LR,
    step_size=st.integers(1, 10),
    milestones=st.lists(st.integers(1, 40), min_size=1, max_size=3, unique=True).map(sorted),
    gamma=FACTOR,
    b1=st.integers(1, 30),
    gap=st.integers(1, 30),
    steps=st.integers(1, 60),
)
def test_join_of_three_equals_sequential_lr(
    peak: float,
    step_size: int,
    milestones: list[int],
    gamma: float,
    b1: int,
    gap: int,
    steps: int,
) -> None:
    n = b1 + gap + steps + 10
    want = torch_lrs(
        lambda o: lrs.SequentialLR(
            o,
            [
                lrs.StepLR(o, step_size, gamma),
                lrs.MultiStepLR(o, milestones, gamma),
                lrs.LinearLR(o, 1.0, 0.1, steps),
            ],
            [b1, b1 + gap],
        ),
        peak,
        n,
    )
    s = S.join(
        [
            S.step_decay(peak, step_size, gamma),
            S.multistep(peak, milestones, gamma),
            S.linear(peak, 0.1 * peak, steps),
        ],
        [b1, b1 + gap],
    )
    assert_matches(ours(s, n), want, peak)


def test_join_restarts_each_schedule_at_its_boundary() -> None:
    a, b, c = S.exponential(1.0, 0.5), S.linear(0.3, 0.0, 4), S.constant(0.7)
    s = S.join([a, b, c], [3, 5])
    assert ours(s, 8) == ours(a, 3) + ours(b, 2) + ours(c, 3)
    assert ours(S.join([a], []), 10) == ours(a, 10)


def test_join_accepts_any_schedule() -> None:
    s = S.join([lambda count: 0.5, lambda count: 2.0 ** -count.double()], [2])
    assert ours(s, 5) == [0.5, 0.5, 1.0, 0.5, 0.25]


# --------------------------------------------------------------------------- what it holds after


def test_schedules_hold_their_last_value_after_they_end() -> None:
    assert ours(S.linear(0.1, 0.02, 5), 9)[5:] == [0.02] * 4
    assert ours(S.cosine_decay(0.1, 5, end=0.01), 9)[5:] == [0.01] * 4
    assert ours(S.warmup_cosine(0.1, 2, 5, end=0.01), 9)[5:] == [0.01] * 4
    one = S.one_cycle(0.1, total_steps=6)
    assert ours(one, 9)[5:] == [ours(one, 6)[5]] * 4
    assert math.isclose(ours(one, 6)[5], 0.1 / 25 / 1e4, rel_tol=1e-12)


# --------------------------------------------------------------------------- the call contract

ALL = [
    S.constant(0.1),
    S.linear(0.0, 0.1, 10),
    S.cosine_decay(0.1, 50, end=0.01),
    S.exponential(0.1, 0.97),
    S.multistep(0.1, [5, 20], 0.5),
    S.step_decay(0.1, 7, 0.5),
    S.warmup_cosine(0.1, 10, 60, end=0.01, init=0.001),
    S.one_cycle(0.1, 80),
    S.one_cycle(0.1, 80, pct_start=0.25, anneal_strategy="linear", three_phase=True),
    S.join([S.linear(0.0, 0.1, 10), S.cosine_decay(0.1, 50)], [10]),
]
IDS = [repr(s).split("(")[0] for s in ALL]


@pytest.mark.parametrize("schedule", ALL, ids=IDS)
def test_a_python_int_count_equals_a_tensor_count(schedule: S.Schedule) -> None:
    for t in [0, 1, 9, 10, 11, 79, 100]:
        got = schedule(t)
        assert isinstance(got, torch.Tensor)
        assert got.shape == () and got.dtype == torch.float64
        assert torch.equal(got, schedule(torch.tensor(t)))
        assert torch.equal(got, schedule(torch.tensor(t, dtype=torch.int32)))


@pytest.mark.parametrize("schedule", ALL, ids=IDS)
def test_vmap_over_counts_equals_each_count(schedule: S.Schedule) -> None:
    counts = torch.arange(0, 100)
    batched = torch.func.vmap(schedule)(counts)
    each = torch.stack([schedule(c) for c in counts])
    # A batch runs torch's vectorised pow kernel, which may round an ulp apart from the 0-d
    # path (exponential does); every other op is elementwise and exact.
    torch.testing.assert_close(batched, each, rtol=1e-15, atol=0)
    torch.testing.assert_close(schedule(counts), batched, rtol=0, atol=0)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is handed and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def test_every_schedule_is_captured_as_one_graph_for_every_count() -> None:
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(
        lambda c: torch.stack([s(c) for s in ALL]), fullgraph=True, backend=backend
    )
    for t in range(0, 100, 7):
        count = torch.tensor(t)
        assert torch.equal(compiled(count), torch.stack([s(count) for s in ALL]))
    assert backend.graphs == 1  # no recompilation: the count is only ever a tensor


@pytest.mark.slow
# Inductor itself touches a deprecated torch.jit API on import; that is not ours to fix.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_schedules_compile_with_inductor() -> None:
    torch._dynamo.reset()
    chosen = [ALL[6], ALL[8]]  # warmup_cosine and a three-phase one_cycle: wheres, cos, clamps
    compiled = torch.compile(lambda c: torch.stack([s(c) for s in chosen]), fullgraph=True)
    for t in range(0, 100, 3):
        count = torch.tensor(t)
        want = torch.stack([s(count) for s in chosen])
        # Inductor's generated C++ may fuse or reorder float64 arithmetic by an ulp.
        torch.testing.assert_close(compiled(count), want, rtol=1e-12, atol=1e-18)


def test_values_live_on_the_counts_device_and_keep_its_shape() -> None:
    counts = torch.arange(6).reshape(2, 3)
    for schedule in ALL:
        got = schedule(counts)
        assert got.shape == (2, 3) and got.dtype == torch.float64 and got.device == counts.device


def test_a_schedule_drives_an_optimizer_like_lambda_lr() -> None:
    schedule = S.warmup_cosine(0.5, 3, 12, end=0.05)
    params = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    opt = ll.optim.sgd(lr=schedule)
    state = opt.init(params)
    ref = torch.nn.Parameter(params["w"].clone())
    torch_opt = torch.optim.SGD([ref], lr=0.5)
    lambda_lr = lrs.LambdaLR(torch_opt, lambda t: float(schedule(t)) / 0.5)
    for _ in range(15):
        grads = {"w": 2 * params["w"]}
        params, state = opt.update(grads, state, params)
        ref.grad = 2 * ref.detach().clone()
        torch_opt.step()
        lambda_lr.step()
        # lambda_lr rescales lr / 0.5 * 0.5, which may round an ulp away from the schedule.
        torch.testing.assert_close(params["w"], ref.detach(), rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    ("schedule", "text"),
    [
        (S.constant(0.1), "constant(0.1)"),
        (S.linear(0, 1, 10), "linear(0.0, end=1.0, steps=10)"),
        (S.cosine_decay(0.1, steps=100), "cosine_decay(0.1, steps=100)"),
        (S.cosine_decay(0.1, 100, end=0.001), "cosine_decay(0.1, steps=100, end=0.001)"),
        (S.exponential(0.1, 0.9), "exponential(0.1, gamma=0.9)"),
        (S.multistep(0.1, [3, 7], 0.1), "multistep(0.1, milestones=(3, 7), gamma=0.1)"),
        (S.step_decay(0.1, 30, 0.1), "step_decay(0.1, step_size=30, gamma=0.1)"),
        (
            S.warmup_cosine(6e-4, 2000, 600000, end=6e-5),
            "warmup_cosine(0.0006, warmup_steps=2000, decay_steps=600000, end=6e-05)",
        ),
        (S.one_cycle(0.1, 100), "one_cycle(0.1, total_steps=100)"),
        (
            S.one_cycle(0.1, 100, three_phase=True, div_factor=10),
            "one_cycle(0.1, total_steps=100, div_factor=10.0, three_phase=True)",
        ),
        (
            S.join([S.constant(0.1), S.exponential(0.1, 0.5)], [5]),
            "join([constant(0.1), exponential(0.1, gamma=0.5)], boundaries=(5,))",
        ),
    ],
)
def test_repr_is_the_call_that_builds_it(schedule: S.Schedule, text: str) -> None:
    assert repr(schedule) == text


# --------------------------------------------------------------------------- bad arguments

_LINEAR = S.linear(0.0, 1.0, 5)

BAD_ARGUMENTS = [
    (
        S.constant,
        {"value": float("nan")},
        ValueError,
        "constant(value=nan): value must be a finite real number, got nan.",
    ),
    (
        S.linear,
        {"init": 0.0, "end": 1.0, "steps": 0},
        ValueError,
        "linear(steps=0): steps must be a positive int, got 0.",
    ),
    (
        S.linear,
        {"init": 0.0, "end": 1.0, "steps": 2.5},
        TypeError,
        "linear(steps=2.5): steps must be a positive int, got 2.5.",
    ),
    (
        S.cosine_decay,
        {"init": 0.1, "steps": -10},
        ValueError,
        "cosine_decay(steps=-10): steps must be a positive int, got -10.",
    ),
    (
        S.cosine_decay,
        {"init": "0.1", "steps": 10},
        TypeError,
        "cosine_decay(init='0.1'): init must be a finite real number, got '0.1'.",
    ),
    (
        S.cosine_decay,
        {"init": 0.1, "steps": 10, "end": float("inf")},
        ValueError,
        "cosine_decay(end=inf): end must be a finite real number, got inf.",
    ),
    (
        S.exponential,
        {"init": 0.1, "gamma": 0},
        ValueError,
        "exponential(gamma=0): gamma must be a positive real number, got 0.",
    ),
    (
        S.exponential,
        {"init": 0.1, "gamma": -0.5},
        ValueError,
        "exponential(gamma=-0.5): gamma must be a positive real number, got -0.5.",
    ),
    (
        S.step_decay,
        {"init": 0.1, "step_size": 0, "gamma": 0.5},
        ValueError,
        "step_decay(step_size=0): step_size must be a positive int, got 0.",
    ),
    (
        S.step_decay,
        {"init": 0.1, "step_size": 10, "gamma": 0.0},
        ValueError,
        "step_decay(gamma=0.0): gamma must be a positive real number, got 0.0.",
    ),
    (
        S.multistep,
        {"init": 0.1, "milestones": [30, 10], "gamma": 0.1},
        ValueError,
        "multistep(milestones=[30, 10]): milestones must be a strictly increasing sequence of "
        "positive ints, got [30, 10]. milestones[1]=10 is not greater than milestones[0]=30.",
    ),
    (
        S.multistep,
        {"init": 0.1, "milestones": [10, 10], "gamma": 0.1},
        ValueError,
        "milestones[1]=10 is not greater than milestones[0]=10.",
    ),
    (
        S.multistep,
        {"init": 0.1, "milestones": [0, 10], "gamma": 0.1},
        ValueError,
        "multistep(milestones=[0, 10]): milestones must be a strictly increasing sequence of "
        "positive ints, got [0, 10]. milestones[0]=0 is not positive.",
    ),
    (
        S.multistep,
        {"init": 0.1, "milestones": [5, 7.5], "gamma": 0.1},
        TypeError,
        "milestones[1]=7.5 is not an int.",
    ),
    (
        S.multistep,
        {"init": 0.1, "milestones": 10, "gamma": 0.1},
        TypeError,
        "multistep(milestones=10): milestones must be a strictly increasing sequence of "
        "positive ints, got 10.",
    ),
    (
        S.multistep,
        {"init": 0.1, "milestones": {10, 20}, "gamma": 0.1},
        TypeError,
        "multistep(milestones={10, 20}): milestones must be a strictly increasing sequence",
    ),
    (
        S.multistep,
        {"init": 0.1, "milestones": [10], "gamma": -1.0},
        ValueError,
        "multistep(gamma=-1.0): gamma must be a positive real number, got -1.0.",
    ),
    (
        S.warmup_cosine,
        {"peak": 0.1, "warmup_steps": 10, "decay_steps": 10},
        ValueError,
        "warmup_cosine(decay_steps=10): decay_steps must be greater than warmup_steps (10), "
        "got 10. The cosine runs from count warmup_steps to count decay_steps (both from 0).",
    ),
    (
        S.warmup_cosine,
        {"peak": 0.1, "warmup_steps": -1, "decay_steps": 10},
        ValueError,
        "warmup_cosine(warmup_steps=-1): warmup_steps must be a non-negative int, got -1.",
    ),
    (
        S.one_cycle,
        {"max_lr": 0.0, "total_steps": 10},
        ValueError,
        "one_cycle(max_lr=0.0): max_lr must be a positive real number, got 0.0.",
    ),
    (
        S.one_cycle,
        {"max_lr": 0.1, "total_steps": 0},
        ValueError,
        "one_cycle(total_steps=0): total_steps must be a positive int, got 0.",
    ),
    (
        S.one_cycle,
        {"max_lr": 0.1, "total_steps": 10, "pct_start": 1.5},
        ValueError,
        "one_cycle(pct_start=1.5): pct_start must be a real number in [0.0, 1.0], got 1.5.",
    ),
    (
        S.one_cycle,
        {"max_lr": 0.1, "total_steps": 10, "anneal_strategy": "cosine"},
        ValueError,
        "one_cycle(anneal_strategy='cosine'): anneal_strategy must be one of ['cos', 'linear'], "
        "got 'cosine'.",
    ),
    (
        S.one_cycle,
        {"max_lr": 0.1, "total_steps": 10, "div_factor": 0},
        ValueError,
        "one_cycle(div_factor=0): div_factor must be a positive real number, got 0.",
    ),
    (
        S.one_cycle,
        {"max_lr": 0.1, "total_steps": 10, "three_phase": 1},
        TypeError,
        "one_cycle(three_phase=1): three_phase must be a bool, got 1.",
    ),
    (
        S.one_cycle,
        {"max_lr": 0.1, "total_steps": 10, "pct_start": 0.6, "three_phase": True},
        ValueError,
        "one_cycle(pct_start=0.6): pct_start must be at most 0.5 with three_phase=True, got 0.6. "
        "The first two phases take 2 * pct_start of the cycle.",
    ),
    (
        S.join,
        {"schedules": [], "boundaries": []},
        TypeError,
        "join(schedules=[]): schedules must be a non-empty sequence of schedules (callables of "
        "the update count), got [].",
    ),
    (
        S.join,
        {"schedules": [_LINEAR, 0.1], "boundaries": [5]},
        TypeError,
        "join(schedules=[linear(0.0, end=1.0, steps=5), 0.1]): schedules must be a non-empty "
        "sequence of schedules (callables of the update count), got "
        "[linear(0.0, end=1.0, steps=5), 0.1]. schedules[1]=0.1 is not callable.",
    ),
    (
        S.join,
        {"schedules": [_LINEAR, _LINEAR], "boundaries": []},
        ValueError,
        "join(boundaries=[]): boundaries must have one entry fewer than schedules (1), got []. "
        "Schedule i runs from boundaries[i - 1] (or 0) to boundaries[i].",
    ),
    (
        S.join,
        {"schedules": [_LINEAR, _LINEAR, _LINEAR], "boundaries": [10, 5]},
        ValueError,
        "join(boundaries=[10, 5]): boundaries must be a strictly increasing sequence of positive "
        "ints, got [10, 5]. boundaries[1]=5 is not greater than boundaries[0]=10.",
    ),
]


@pytest.mark.parametrize(("factory", "kwargs", "exc", "message"), BAD_ARGUMENTS)
def test_bad_arguments_raise_at_construction(
    factory: Callable, kwargs: dict, exc: type[Exception], message: str
) -> None:
    with pytest.raises(exc, match=re.escape(message)):
        factory(**kwargs)


@pytest.mark.parametrize(
    ("count", "shown"),
    [
        (1.5, "1.5"),
        (True, "True"),
        (torch.tensor(3.0), "Tensor(shape=(), dtype=torch.float32)"),
        (torch.tensor(True), "Tensor(shape=(), dtype=torch.bool)"),
    ],
)
def test_a_count_that_is_not_an_integer_raises(count: object, shown: str) -> None:
    message = (
        f"cosine_decay(count={shown}): count must be an int or an integer tensor (the number of "
        f"updates applied so far), got {shown}. Pass the optimizer's count (opt_state.count, "
        "int64), not a float."
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        S.cosine_decay(0.1, 10)(count)  # type: ignore[arg-type]
