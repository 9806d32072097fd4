"""``fold`` and ``scan``: run a step over a stream of batches."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any, cast

import optree
import torch

from . import _validate as v
from ._types import Metrics, TrainState


def _check_batches(func: str, batches: Any) -> None:
    if not isinstance(batches, Iterable):
        v.fail(
            func,
            "batches",
            "must be an iterable of batches (a list, a DataLoader)",
            batches,
            exc=TypeError,
        )


def is_driven(step: Any) -> bool:
    """Whether ``step`` is a looplib step (which ``fold`` drives a window at a time)."""
    return hasattr(step, "run") and hasattr(step, "groups") and hasattr(step, "init")


def own(state: TrainState) -> TrainState:
    """A copy of ``state`` that a driver may donate to the step: the caller's state is never
    written."""
    tree: Any = state
    return cast(
        TrainState,
        optree.tree_map(
            lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree, none_is_leaf=True
        ),
    )


def drive(
    func: str,
    step: Any,
    state: TrainState,
    batches: Iterable[Any],
    after: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Run a looplib step over ``batches`` a window at a time (see :func:`fold`)."""
    v.train_state(func, state)
    stream = iter(batches)
    first = next(stream, _END)
    if first is _END:
        return state
    state = step.init(state, first)
    step.check_structure(state, func)
    position = step.position(state)
    work = own(state)
    for calls, (group, start) in enumerate(step.groups(itertools.chain([first], stream), position)):
        work = step.run(work, group, start, donate=True)
        if calls == 0:  # every path a window can take runs in its first call
            step.check_output(state, work)
        if after is not None:
            after(work)
    step.check_output(state, work)
    step.check(work)
    return work


_END: Any = object()


def fold(
    step: Callable[[TrainState, Any], TrainState], state: TrainState, batches: Iterable[Any]
) -> TrainState:
    """Run ``step`` over ``batches``, threading the state: a left fold.

    ``fold(step, state, batches)`` is ``functools.reduce(step, batches, state)``::

        for batch in batches:
            state = step(state, batch)
        return state

    For a looplib step it is also faster than that loop, with the same result: it completes the
    state's structure once (``step.init``), hands the step whole accumulation windows (so only
    the closing micro-batch runs the optimizer, and ``ll.compile`` captures one update per
    call), and lets the optimizer write into the states it made itself, never into the one
    passed in. It runs the transformers' host-side checks (``skip_nonfinite``'s limit) at the
    end. An accumulation window still open at the end stays open in the returned state; end it
    with ``step.flush(state)``.

    Example:
        >>> import looplib as ll, torch
        >>> model, opt = torch.nn.Linear(2, 1), ll.optim.sgd(lr=0.1)
        >>> step = ll.train_step(model, lambda m, b: m(b).pow(2).mean(), opt)
        >>> int(ll.fold(step, ll.init(model, opt), [torch.ones(4, 2)] * 3).step)
        3
    """
    v.is_callable("fold", "step", step, "a step (state, batch) -> state")
    _check_batches("fold", batches)
    if is_driven(step):
        return drive("fold", step, state, batches)
    for batch in batches:
        state = step(state, batch)
    return state


def scan(
    step: Callable[[TrainState, Any], TrainState], state: TrainState, batches: Iterable[Any]
) -> tuple[TrainState, list[Metrics]]:
    """Like :func:`fold`, and also return ``state.metrics`` (as tensors) after every update.

    The analogue of ``jax.lax.scan`` with the metrics as the per-step outputs. A looplib step
    is called once per optimizer update (``k`` batches under ``accumulate(k)``, one batch
    otherwise; one batch, however many chunks, under ``tbptt_split``), so there is one entry per
    call; a plain function is called once per batch.
    """
    v.is_callable("scan", "step", step, "a step (state, batch) -> state")
    _check_batches("scan", batches)
    outputs: list[Metrics] = []
    if is_driven(step):

        def keep(state: TrainState) -> None:
            outputs.append({k: m.clone() for k, m in state.metrics.items()})

        return drive("scan", step, state, batches, keep), outputs
    for batch in batches:
        state = step(state, batch)
        outputs.append(state.metrics)
    return state, outputs
