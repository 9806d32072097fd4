"""The non-finite guard ``fit`` and ``epoch`` put before the optimizer's result is kept.

An update whose loss is not finite, or which would leave a non-finite value in the params or the
optimizer state, is never applied: the state stays as it was before it. Once the guard has
refused an update it refuses every later one too (the state is frozen at the last good update),
until a host-side check (:meth:`Step.check`, run by ``fit`` at its read points and by ``epoch``
at its end) reads the slot and raises :class:`NonFiniteLossError` with that state. So the state
a check hands back, and every state ``fit`` saves, holds only finite params and optimizer values,
and it is the state of the last good update, not one trained further past a bad batch.

The decision is a select on tensors: the step reads nothing on the host. An explicit
``skip_nonfinite(n)`` earlier in the chain keeps its own semantics (bad gradients are skipped and
counted); the guard then only sees what gets past it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import optree
import torch

from . import _ops
from ._checkpoint import register_checkpoint_type
from ._step import ApplyFn, Micro, Stage
from ._tree import select
from ._types import Metrics, Tensor, TrainState

SLOT = "nonfinite"

MESSAGE = (
    "fit: an update at step {at} was not finite (a NaN or infinite loss, gradient, parameter or "
    "optimizer value) and was not applied; the error's .state is the last good state (step "
    "{at}), with finite params and optimizer state. Lower the learning rate, clip the gradient, "
    "check the data, or compose ll.skip_nonfinite(n) to skip such steps and go on."
)


class NonFiniteLossError(FloatingPointError):
    """Raised by :func:`fit` (and :func:`epoch`) when an update was not finite.

    Attributes:
        state: the last good state: the one before the first update the guard refused. Its
            params and optimizer state are finite.
        history: the history of the completed epochs (filled in by ``fit``; ``[]`` otherwise).
        epoch: the epoch in which it was found (by ``fit``; ``None`` otherwise).
        step: the number of updates the last good state had applied.
    """

    def __init__(self, message: str, state: TrainState, history: Any = None) -> None:
        super().__init__(message)
        self.state = state
        self.history = [] if history is None else history
        self.epoch: int | None = None
        self.step = int(state.step.reshape(-1)[0])


@register_checkpoint_type
class GuardState(NamedTuple):
    """The guard's slot: whether it has refused an update, and the step count then (-1: never)."""

    tripped: Tensor
    at: Tensor


def finite(tensors: list[Tensor]) -> Tensor:
    """A 0-d bool tensor: every element of every floating tensor is finite (no host read).

    The inf-norm of each tensor (its largest magnitude) is finite exactly when all its elements
    are, and unlike a sum it never overflows.
    """
    floats = [t for t in tensors if t.is_floating_point()]
    if not floats:
        return torch.ones((), dtype=torch.bool)
    norms = torch.stack([n.to(torch.float32) for n in _ops.norm(floats, math.inf)])
    return torch.isfinite(norms).all()


def guard() -> Stage:
    """The stage (see the module)."""

    def init(state: TrainState, loss: Metrics | None) -> TrainState:
        if SLOT in state.slots:
            return state
        device = state.step.device
        slot = GuardState(
            torch.zeros((), dtype=torch.bool, device=device),
            torch.full((), -1, dtype=torch.int64, device=device),
        )
        return state._replace(slots={**state.slots, SLOT: slot})

    def wrap(inner: ApplyFn) -> ApplyFn:
        def apply(state: TrainState, micro: Micro) -> TrainState:
            slot: GuardState = state.slots[SLOT]
            # Not in place: the state before the update is kept if the update is refused.
            new = inner(state, micro._replace(inplace=False))
            leaves: Any = (new.params, new.opt_state)
            ok = (
                ~slot.tripped
                & torch.isfinite(micro.metrics["loss"]).all()
                & finite(optree.tree_leaves(leaves, none_is_leaf=False))
            )
            at = torch.where(slot.tripped, slot.at, state.step)
            refused = GuardState(torch.ones_like(slot.tripped), at)
            kept = state._replace(slots={**state.slots, SLOT: refused})
            return select(ok, new, kept)

        return apply

    def check(state: TrainState) -> None:
        slot: GuardState = state.slots[SLOT]
        if bool(slot.tripped.any()):
            raise NonFiniteLossError(MESSAGE.format(at=int(slot.at.max())), state)

    return Stage("guard()", wrap, init=init, slot=SLOT, check=check)
