"""``fold`` and ``scan``: run a step over a stream of batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

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


def fold(
    step: Callable[[TrainState, Any], TrainState], state: TrainState, batches: Iterable[Any]
) -> TrainState:
    """Run ``step`` over ``batches``, threading the state: a left fold.

    ``fold(step, state, batches)`` is ``functools.reduce(step, batches, state)``::

        for batch in batches:
            state = step(state, batch)
        return state

    An accumulation window still open at the end stays open in the returned state; end it with
    ``step.flush(state)``.

    Example:
        >>> import looplib as ll, torch
        >>> model, opt = torch.nn.Linear(2, 1), ll.optim.sgd(lr=0.1)
        >>> step = ll.train_step(model, lambda m, b: m(b).pow(2).mean(), opt)
        >>> int(ll.fold(step, ll.init(model, opt), [torch.ones(4, 2)] * 3).step)
        3
    """
    v.is_callable("fold", "step", step, "a step (state, batch) -> state")
    _check_batches("fold", batches)
    for batch in batches:
        state = step(state, batch)
    return state


def scan(
    step: Callable[[TrainState, Any], TrainState], state: TrainState, batches: Iterable[Any]
) -> tuple[TrainState, list[Metrics]]:
    """Like :func:`fold`, and also return each step's ``state.metrics`` (as tensors), in order.

    The analogue of ``jax.lax.scan`` with the metrics as the per-step outputs.
    """
    v.is_callable("scan", "step", step, "a step (state, batch) -> state")
    _check_batches("scan", batches)
    outputs: list[Metrics] = []
    for batch in batches:
        state = step(state, batch)
        outputs.append(state.metrics)
    return state, outputs
