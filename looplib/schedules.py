"""Learning-rate schedules: pure functions of the optimizer's update count, as in optax.

A schedule is a callable ``schedule(count) -> value`` (the :data:`Schedule` type)::

    Schedule = Callable[[Tensor], float | Tensor]

``count`` is the number of updates applied *before* this one (0 for the first), a 0-d ``int64``
tensor such as ``opt_state.count``; a plain Python ``int`` is accepted too. This is
``LambdaLR``'s convention: ``torch.optim`` with its learning rate set to ``schedule(t)`` before
its ``t``-th step (counting from 0) takes the same steps. Pass a schedule wherever a learning
rate is expected, e.g. ``looplib.optim.sgd(lr=cosine_decay(0.1, steps=1000))``.

Every schedule here returns a ``float64`` tensor on ``count``'s device, of ``count``'s shape (it
works elementwise). It is tensor arithmetic only: no host read of ``count`` and no Python branch
on it (phases are picked with ``torch.where``), so it runs inside ``torch.compile(...,
fullgraph=True)``, under ``torch.func.vmap`` and in CUDA graphs. Arguments are checked when the
schedule is built. Each equals the ``torch.optim.lr_scheduler`` of the same meaning, update by
update, up to the rounding of torch's recursive formulas (the tests say where they differ).

Example:
    >>> import torch
    >>> from looplib import schedules
    >>> lr = schedules.warmup_cosine(1e-3, warmup_steps=10, decay_steps=100)
    >>> lr
    warmup_cosine(0.001, warmup_steps=10, decay_steps=100)
    >>> lr(torch.tensor(10))
    tensor(0.0010, dtype=torch.float64)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _validate as v
from ._types import Schedule, Tensor

__all__ = [
    "Schedule",
    "constant",
    "cosine_decay",
    "exponential",
    "join",
    "linear",
    "multistep",
    "one_cycle",
    "step_decay",
    "warmup_cosine",
]

_COUNT_RULE = "must be an int or an integer tensor (the number of updates applied so far)"
_COUNT_FIX = "Pass the optimizer's count (opt_state.count, int64), not a float."
_INCREASING_RULE = "must be a strictly increasing sequence of positive ints"
_SCHEDULES_RULE = "must be a non-empty sequence of schedules (callables of the update count)"


class _Built:
    """A schedule of this module: ``fn`` of the integer count tensor, with a readable repr."""

    __slots__ = ("_fn", "_name", "_text")

    def __init__(self, name: str, fn: Callable[[Tensor], Tensor], text: str) -> None:
        self._name = name
        self._fn = fn
        self._text = text

    def __call__(self, count: Tensor | int) -> Tensor:
        return self._fn(_as_count(self._name, count))

    def __repr__(self) -> str:
        return self._text


def _as_count(func: str, count: Any) -> Tensor:
    # Checks the type and dtype only (no tensor is read), so torch.compile keeps it as a guard.
    if isinstance(count, Tensor):
        if count.dtype.is_floating_point or count.dtype.is_complex or count.dtype == torch.bool:
            v.fail(func, "count", _COUNT_RULE, count, _COUNT_FIX, TypeError)
        return count
    if not isinstance(count, numbers.Integral) or isinstance(count, bool):
        v.fail(func, "count", _COUNT_RULE, count, _COUNT_FIX, TypeError)
    return torch.as_tensor(int(count), dtype=torch.int64)


def _f64(count: Tensor) -> Tensor:
    return count.to(torch.float64)


def _text(name: str, first: Any, **named: Any) -> str:
    """``name(first, k=v, ...)``: the call that builds the schedule, defaults left out."""
    return f"{name}({', '.join([repr(first), *(f'{k}={x!r}' for k, x in named.items())])})"


def _increasing_ints(func: str, arg: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple, range)):
        v.fail(func, arg, _INCREASING_RULE, value, exc=TypeError)
    out: list[int] = []
    for i, x in enumerate(value):
        if not isinstance(x, numbers.Integral) or isinstance(x, bool):
            v.fail(
                func, arg, _INCREASING_RULE, value, f"{arg}[{i}]={x!r} is not an int.", TypeError
            )
        if x < 1:
            v.fail(func, arg, _INCREASING_RULE, value, f"{arg}[{i}]={x!r} is not positive.")
        if out and x <= out[-1]:
            fix = f"{arg}[{i}]={x!r} is not greater than {arg}[{i - 1}]={out[-1]!r}."
            v.fail(func, arg, _INCREASING_RULE, value, fix)
        out.append(int(x))
    return tuple(out)


def _check_bool(func: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        v.fail(func, arg, "must be a bool", value, exc=TypeError)
    return value


# --------------------------------------------------------------------------- simple shapes


def constant(value: float) -> Schedule:
    """The same value at every count (``ConstantLR`` with ``factor=1``, or a fixed ``lr``).

    ::

        constant(value)(t) = value

    Args:
        value: the value, a finite real number.

    Returns:
        A schedule ``count -> value``.

    Example:
        >>> import torch
        >>> s = constant(0.1)
        >>> s, s(torch.tensor(7))
        (constant(0.1), tensor(0.1000, dtype=torch.float64))
    """
    value = v.finite("constant", "value", value)

    def fn(count: Tensor) -> Tensor:
        return torch.full_like(_f64(count), value)

    return _Built("constant", fn, _text("constant", value))


def linear(init: float, end: float, steps: int) -> Schedule:
    """Linear from ``init`` at count 0 to ``end`` at count ``steps``, then ``end`` for good.

    ::

        linear(init, end, steps)(t) = init + (end - init) * min(t, steps) / steps

    ``LinearLR(start_factor=init / lr, end_factor=end / lr, total_iters=steps)`` on a base
    learning rate ``lr``; unlike it, neither end needs to be at most ``lr`` and ``init`` may be
    0. Computed with ``torch.lerp``, so count 0 gives ``init`` and count ``steps`` gives ``end``
    exactly.

    Args:
        init: the value at count 0, a finite real number.
        end: the value from count ``steps`` on, a finite real number.
        steps: the number of updates the ramp takes, a positive int.

    Returns:
        A schedule ``count -> value``.

    Example:
        >>> import torch
        >>> s = linear(0.0, 0.1, steps=4)
        >>> s
        linear(0.0, end=0.1, steps=4)
        >>> s(torch.arange(6))
        tensor([0.0000, 0.0250, 0.0500, 0.0750, 0.1000, 0.1000], dtype=torch.float64)
    """
    name = "linear"
    init = v.finite(name, "init", init)
    end = v.finite(name, "end", end)
    steps = v.positive_int(name, "steps", steps)

    def fn(count: Tensor) -> Tensor:
        t = _f64(count)
        frac = t.clamp(max=steps) / steps
        return torch.lerp(torch.full_like(t, init), torch.full_like(t, end), frac)

    return _Built(name, fn, _text(name, init, end=end, steps=steps))


def cosine_decay(init: float, steps: int, end: float = 0.0) -> Schedule:
    """Half a cosine from ``init`` at count 0 to ``end`` at count ``steps``, then ``end``.

    ::

        def cosine_decay(t):
            t = min(t, steps)
            return end + (init - end) * (1 + cos(pi * t / steps)) / 2

    ``CosineAnnealingLR(T_max=steps, eta_min=end)`` on a base learning rate ``init``, for
    counts up to ``steps``. After ``steps`` this schedule holds ``end``, where
    ``CosineAnnealingLR`` keeps following the cosine back up (a period of ``2 * steps``).

    Args:
        init: the value at count 0, a finite real number.
        steps: the number of updates the decay takes, a positive int.
        end: the value from count ``steps`` on, a finite real number (it may exceed ``init``).

    Returns:
        A schedule ``count -> value``.

    Example:
        >>> import torch
        >>> s = cosine_decay(0.1, steps=100)
        >>> s
        cosine_decay(0.1, steps=100)
        >>> s(torch.tensor([0, 50, 100, 150]))
        tensor([0.1000, 0.0500, 0.0000, 0.0000], dtype=torch.float64)
    """
    name = "cosine_decay"
    init = v.finite(name, "init", init)
    steps = v.positive_int(name, "steps", steps)
    end = v.finite(name, "end", end)

    def fn(count: Tensor) -> Tensor:
        t = _f64(count).clamp(max=steps)
        # CosineAnnealingLR's closed form, in its order of operations.
        return end + (init - end) * (1 + torch.cos(math.pi * t / steps)) / 2

    named: dict[str, Any] = {"steps": steps} | ({"end": end} if end else {})
    return _Built(name, fn, _text(name, init, **named))


def exponential(init: float, gamma: float) -> Schedule:
    """Multiply by ``gamma`` at every update (``ExponentialLR``).

    ::

        exponential(init, gamma)(t) = init * gamma ** t

    Args:
        init: the value at count 0, a finite real number.
        gamma: the factor per update, a positive finite real number.

    Returns:
        A schedule ``count -> value``.

    Example:
        >>> import torch
        >>> s = exponential(0.1, gamma=0.5)
        >>> s, s(torch.tensor(3))
        (exponential(0.1, gamma=0.5), tensor(0.0125, dtype=torch.float64))
    """
    name = "exponential"
    init = v.finite(name, "init", init)
    gamma = v.positive(name, "gamma", gamma)

    def fn(count: Tensor) -> Tensor:
        return init * torch.pow(gamma, _f64(count))

    return _Built(name, fn, _text(name, init, gamma=gamma))


def multistep(init: float, milestones: Sequence[int], gamma: float) -> Schedule:
    """Multiply by ``gamma`` at each milestone (``MultiStepLR``).

    ::

        multistep(init, milestones, gamma)(t) = init * gamma ** sum(t >= m for m in milestones)

    The factor is applied once per milestone passed, as ``MultiStepLR`` does, so the values
    equal its to the last bit.

    Args:
        init: the value before the first milestone, a finite real number.
        milestones: the counts at which the value drops, a strictly increasing sequence of
            positive ints (possibly empty).
        gamma: the factor at each milestone, a positive finite real number.

    Returns:
        A schedule ``count -> value``.

    Example:
        >>> import torch
        >>> s = multistep(1.0, milestones=[2, 4], gamma=0.1)
        >>> s
        multistep(1.0, milestones=(2, 4), gamma=0.1)
        >>> s(torch.arange(6))
        tensor([1.0000, 1.0000, 0.1000, 0.1000, 0.0100, 0.0100], dtype=torch.float64)
    """
    name = "multistep"
    init = v.finite(name, "init", init)
    milestones = _increasing_ints(name, "milestones", milestones)
    gamma = v.positive(name, "gamma", gamma)

    def fn(count: Tensor) -> Tensor:
        value = torch.full_like(_f64(count), init)
        for m in milestones:
            value = torch.where(count >= m, value * gamma, value)
        return value

    return _Built(name, fn, _text(name, init, milestones=milestones, gamma=gamma))


def step_decay(init: float, step_size: int, gamma: float) -> Schedule:
    """Multiply by ``gamma`` every ``step_size`` updates (``StepLR``).

    ::

        step_decay(init, step_size, gamma)(t) = init * gamma ** (t // step_size)

    Args:
        init: the value at count 0, a finite real number.
        step_size: the number of updates between drops, a positive int.
        gamma: the factor at each drop, a positive finite real number.

    Returns:
        A schedule ``count -> value``.

    Example:
        >>> import torch
        >>> s = step_decay(1.0, step_size=2, gamma=0.5)
        >>> s
        step_decay(1.0, step_size=2, gamma=0.5)
        >>> s(torch.arange(6))
        tensor([1.0000, 1.0000, 0.5000, 0.5000, 0.2500, 0.2500], dtype=torch.float64)
    """
    name = "step_decay"
    init = v.finite(name, "init", init)
    step_size = v.positive_int(name, "step_size", step_size)
    gamma = v.positive(name, "gamma", gamma)

    def fn(count: Tensor) -> Tensor:
        drops = torch.div(count, step_size, rounding_mode="floor")
        return init * torch.pow(gamma, _f64(drops))

    return _Built(name, fn, _text(name, init, step_size=step_size, gamma=gamma))


# --------------------------------------------------------------------------- warmup and cycles


def warmup_cosine(
    peak: float, warmup_steps: int, decay_steps: int, end: float = 0.0, init: float = 0.0
) -> Schedule:
    """Linear warmup to ``peak``, then half a cosine down to ``end``: nanoGPT's ``get_lr``.

    ``decay_steps`` counts from 0, like nanoGPT's ``lr_decay_iters``: the cosine runs from count
    ``warmup_steps`` to count ``decay_steps``. With ``init=0`` this is exactly
    ``get_lr(it)`` of nanoGPT's ``train.py`` (``learning_rate=peak``, ``warmup_iters=
    warmup_steps``, ``lr_decay_iters=decay_steps``, ``min_lr=end``)::

        def warmup_cosine(t):
            if t < warmup_steps:
                return init + (peak - init) * (t + 1) / (warmup_steps + 1)
            if t > decay_steps:
                return end
            ratio = (t - warmup_steps) / (decay_steps - warmup_steps)
            return end + 0.5 * (1.0 + cos(pi * ratio)) * (peak - end)

    The warmup is the line from ``init`` at count -1 to ``peak`` at count ``warmup_steps``, so
    the first update already has a non-zero rate (nanoGPT's rule since its December 2024 fix;
    it used ``t / warmup_steps`` before). For a warmup that starts *at* ``init`` on count 0, as
    optax's ``warmup_cosine_decay_schedule`` does, write ``join([linear(init, peak,
    warmup_steps), cosine_decay(peak, decay_steps - warmup_steps, end)], [warmup_steps])``.

    Args:
        peak: the value at count ``warmup_steps``, a finite real number.
        warmup_steps: the number of warmup updates, a non-negative int (0: no warmup).
        decay_steps: the count at which the cosine reaches ``end``, an int greater than
            ``warmup_steps``.
        end: the value from count ``decay_steps`` on, a finite real number.
        init: where the warmup line starts (at count -1), a finite real number.

    Returns:
        A schedule ``count -> value``.

    Example:
        >>> import torch
        >>> s = warmup_cosine(1.0, warmup_steps=3, decay_steps=7)
        >>> s
        warmup_cosine(1.0, warmup_steps=3, decay_steps=7)
        >>> s(torch.arange(9))
        tensor([0.2500, 0.5000, 0.7500, 1.0000, 0.8536, 0.5000, 0.1464, 0.0000, 0.0000],
               dtype=torch.float64)
    """
    name = "warmup_cosine"
    peak = v.finite(name, "peak", peak)
    warmup = v.nonnegative_int(name, "warmup_steps", warmup_steps)
    decay = v.positive_int(name, "decay_steps", decay_steps)
    if decay <= warmup:
        v.fail(
            name,
            "decay_steps",
            f"must be greater than warmup_steps ({warmup})",
            decay,
            "The cosine runs from count warmup_steps to count decay_steps (both from 0).",
        )
    end = v.finite(name, "end", end)
    init = v.finite(name, "init", init)

    def fn(count: Tensor) -> Tensor:
        t = _f64(count).clamp(max=decay)
        # nanoGPT's expressions in its order of operations, so init=0 matches it bit for bit
        # (up to torch.cos against math.cos).
        warm = init + (peak - init) * (t + 1) / (warmup + 1)
        ratio = (t - warmup) / (decay - warmup)
        cool = end + 0.5 * (1.0 + torch.cos(math.pi * ratio)) * (peak - end)
        return torch.where(count < warmup, warm, cool)

    named: dict[str, Any] = {"warmup_steps": warmup, "decay_steps": decay}
    named |= ({"end": end} if end else {}) | ({"init": init} if init else {})
    return _Built(name, fn, _text(name, peak, **named))


def one_cycle(
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """The 1cycle policy: the learning rate of ``OneCycleLR`` with the same arguments.

    With ``lo = max_lr / div_factor`` and ``floor = lo / final_div_factor``, the counts
    ``0 .. total_steps - 1`` are cut into phases at ``e1 = pct_start * total_steps - 1`` and
    (``three_phase``) ``e2 = 2 * pct_start * total_steps - 2``; a count belongs to the first
    phase whose end it does not pass, and each phase anneals (``"cos"`` or ``"linear"``)::

        phases = [(e1, lo, max_lr), (total_steps - 1, max_lr, floor)]                  # 2 phases
        phases = [(e1, lo, max_lr), (e2, max_lr, lo), (total_steps - 1, lo, floor)]   # 3 phases

        def one_cycle(t):
            t, begin = min(t, total_steps - 1), 0
            for i, (stop, a, b) in enumerate(phases):
                if t <= stop or i == len(phases) - 1:
                    pct = (t - begin) / (stop - begin)
                    return b + (a - b) / 2 * (cos(pi * pct) + 1)   # or (b - a) * pct + a
                begin = stop

    From count ``total_steps - 1`` on the value holds at ``floor``: ``OneCycleLR`` raises when
    stepped beyond ``total_steps`` (and the value it sets after the last update extrapolates
    past ``floor``). Where ``pct_start * total_steps == 1`` the first phase is the single count
    0, where ``OneCycleLR`` divides 0 by 0 (``ZeroDivisionError``); here it gives ``lo``.

    Args:
        max_lr: the peak value, a positive finite real number.
        total_steps: the number of updates in the cycle, a positive int.
        pct_start: the fraction of the cycle spent rising, in [0, 1] (at most 0.5 with
            ``three_phase``).
        anneal_strategy: ``"cos"`` or ``"linear"``.
        div_factor: ``max_lr / div_factor`` is the starting value; positive, finite.
        final_div_factor: ``max_lr / div_factor / final_div_factor`` is the final value;
            positive, finite.
        three_phase: fall back to ``max_lr / div_factor`` symmetrically before annealing to
            the final value (the original paper's policy) instead of two phases (fastai's).

    Returns:
        A schedule ``count -> value``.

    Example:
        >>> import torch
        >>> s = one_cycle(1.0, total_steps=10, pct_start=0.5, anneal_strategy="linear")
        >>> s
        one_cycle(1.0, total_steps=10, pct_start=0.5, anneal_strategy='linear')
        >>> s(torch.tensor([0, 4, 9]))
        tensor([4.0000e-02, 1.0000e+00, 4.0000e-06], dtype=torch.float64)
    """
    name = "one_cycle"
    max_lr = v.positive(name, "max_lr", max_lr)
    total = v.positive_int(name, "total_steps", total_steps)
    pct_start = v.in_range(name, "pct_start", pct_start, 0.0, 1.0)
    anneal = v.one_of(name, "anneal_strategy", anneal_strategy, ["cos", "linear"])
    div_factor = v.positive(name, "div_factor", div_factor)
    final_div_factor = v.positive(name, "final_div_factor", final_div_factor)
    three_phase = _check_bool(name, "three_phase", three_phase)
    if three_phase and pct_start > 0.5:
        v.fail(
            name,
            "pct_start",
            "must be at most 0.5 with three_phase=True",
            pct_start,
            "The first two phases take 2 * pct_start of the cycle.",
        )
    lo = max_lr / div_factor
    floor = lo / final_div_factor
    # (last count, start value, end value) of each phase; the ends computed as OneCycleLR does.
    e1 = float(pct_start * total) - 1
    if three_phase:
        spans = [
            (e1, lo, max_lr),
            (float(2 * pct_start * total) - 2, max_lr, lo),
            (total - 1, lo, floor),
        ]
    else:
        spans = [(e1, lo, max_lr), (total - 1, max_lr, floor)]
    phases = []
    begin = 0.0
    for stop, a, b in spans:
        # A zero-length phase is reached only at count 0 == e1 (see the docstring); pct is 0.
        phases.append((stop, begin, (stop - begin) or 1.0, a, b))
        begin = stop

    def anneal_fn(a: float, b: float, pct: Tensor) -> Tensor:
        # OneCycleLR's _annealing_cos and _annealing_linear, in their order of operations.
        if anneal == "cos":
            return b + (a - b) / 2.0 * (torch.cos(math.pi * pct) + 1)
        return (b - a) * pct + a

    def fn(count: Tensor) -> Tensor:
        t = _f64(count).clamp(max=total - 1)
        # A count belongs to the first phase whose end it does not pass (the last one if none).
        *first, (_, start, length, a, b) = phases
        value = anneal_fn(a, b, (t - start) / length)
        for stop, start, length, a, b in reversed(first):
            value = torch.where(t <= stop, anneal_fn(a, b, (t - start) / length), value)
        return value

    named: dict[str, Any] = {"total_steps": total}
    defaults = {
        "pct_start": 0.3,
        "anneal_strategy": "cos",
        "div_factor": 25.0,
        "final_div_factor": 1e4,
        "three_phase": False,
    }
    given = {
        "pct_start": pct_start,
        "anneal_strategy": anneal,
        "div_factor": div_factor,
        "final_div_factor": final_div_factor,
        "three_phase": three_phase,
    }
    named |= {k: x for k, x in given.items() if x != defaults[k]}
    return _Built(name, fn, _text(name, max_lr, **named))


# --------------------------------------------------------------------------- composition


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run schedules one after another, each restarted from count 0 at its boundary.

    Schedule ``i`` covers the counts in ``[boundaries[i - 1], boundaries[i])`` (the first from
    0, the last for good) and sees the count relative to its start::

        def join(t):
            i = sum(t >= b for b in boundaries)
            start = boundaries[i - 1] if i else 0
            return schedules[i](t - start)

    As ``SequentialLR(schedulers, milestones=boundaries)``, except that each schedule carries
    its own values (``SequentialLR``'s schedulers all scale one base learning rate). Every
    schedule is evaluated at every count (at ``max(t - start, 0)``), and ``torch.where`` keeps
    the right one.

    Args:
        schedules: the schedules, a non-empty sequence of callables of the update count (those
            of this module or any other :data:`Schedule`).
        boundaries: the counts at which the next schedule takes over, a strictly increasing
            sequence of positive ints, one fewer than ``schedules``.

    Returns:
        A schedule ``count -> value``.

    Example:
        >>> import torch
        >>> s = join([linear(0.0, 1.0, steps=2), exponential(1.0, gamma=0.5)], boundaries=[2])
        >>> s
        join([linear(0.0, end=1.0, steps=2), exponential(1.0, gamma=0.5)], boundaries=(2,))
        >>> s(torch.arange(5))
        tensor([0.0000, 0.5000, 1.0000, 0.5000, 0.2500], dtype=torch.float64)
    """
    name = "join"
    if not isinstance(schedules, (list, tuple)) or not schedules:
        v.fail(name, "schedules", _SCHEDULES_RULE, schedules, exc=TypeError)
    for i, s in enumerate(schedules):
        if not callable(s):
            v.fail(
                name,
                "schedules",
                _SCHEDULES_RULE,
                schedules,
                f"schedules[{i}]={s!r} is not callable.",
                TypeError,
            )
    parts = tuple(schedules)
    bounds = _increasing_ints(name, "boundaries", boundaries)
    if len(bounds) != len(parts) - 1:
        v.fail(
            name,
            "boundaries",
            f"must have one entry fewer than schedules ({len(parts) - 1})",
            boundaries,
            "Schedule i runs from boundaries[i - 1] (or 0) to boundaries[i].",
        )

    def value_at(schedule: Schedule, count: Tensor) -> Tensor:
        out = schedule(count)
        if isinstance(out, Tensor):
            return out.to(torch.float64)
        return torch.full_like(_f64(count), out)

    def fn(count: Tensor) -> Tensor:
        value = value_at(parts[0], count)
        for b, schedule in zip(bounds, parts[1:], strict=True):
            later = value_at(schedule, (count - b).clamp(min=0))
            value = torch.where(count >= b, later, value)
        return value

    return _Built(name, fn, f"join({list(parts)!r}, boundaries={bounds!r})")
