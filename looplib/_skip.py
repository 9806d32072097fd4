"""``skip_nonfinite``: leave the state untouched by a step whose gradient or loss is not finite."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _ops
from . import _validate as v
from ._checkpoint import register_checkpoint_type
from ._step import ApplyFn, Micro, Stage, branch
from ._transform import Transformer, stage_transformer
from ._types import Metrics, Params, Tensor, TrainState

SLOT = "skip_nonfinite"


@register_checkpoint_type
class SkipState(NamedTuple):
    """The ``skip_nonfinite`` slot: consecutive and total skipped gradients, and the value of
    ``state.step`` when the last one was skipped (-1 for never)."""

    consecutive: Tensor
    total: Tensor
    last_step: Tensor


class NonFiniteGradientError(FloatingPointError):
    """Raised where ``fold`` or ``fit`` check a state (see :func:`skip_nonfinite`) after more
    than ``max_consecutive`` consecutive non-finite gradients.

    ``state`` is the state checked: its params and optimizer state are those of the last good
    update, since every bad one was skipped.
    """

    def __init__(self, message: str, state: TrainState) -> None:
        super().__init__(message)
        self.state = state


def all_finite(grads: Params) -> Tensor:
    """One 0-d bool tensor: every element of every gradient is finite (no host sync)."""
    values = list(grads.values())
    if not values:
        return torch.ones((), dtype=torch.bool)
    # The 1-norm is finite only if every element is; one reduction per tensor.
    sums = torch.stack([n.to(torch.float32) for n in _ops.norm(values, 1.0)])
    return torch.isfinite(sums.sum())


def skip_nonfinite(max_consecutive: int = 10) -> Transformer:
    """Skip updates whose gradient (or the micro-batch's loss) is not finite.

    A skipped gradient changes nothing downstream: the params, the optimizer state,
    ``state.step`` and ``state.metrics`` stay as they were, and the slot
    ``state.slots["skip_nonfinite"]`` counts it. (The buffers, such as BatchNorm's running
    statistics, are kept by the step itself for any micro-batch whose loss is not finite.) The
    decision is a select on a tensor: the step never reads a device value. ``fold``, ``fit``
    and ``step.check(state)`` raise :class:`NonFiniteGradientError` when the slot shows more
    than ``max_consecutive`` skips in a row (its ``.state`` holds the last good params).

    Where it stands in a chain sets its scope, like every gradient transformer:

    * ``chain(skip_nonfinite(), accumulate(K), ...)``: each micro-batch is checked, and a bad
      one never reaches the window (which closes after K good micro-batches);
    * ``chain(accumulate(K), skip_nonfinite(), clip(c))``: the accumulated gradient is checked
      when the window closes, and a bad window is dropped whole.

    Put it before ``clip``: clipping an infinite norm makes every gradient NaN, and the check
    then still skips, but ``track_norm`` placed between would record NaN.

    Args:
        max_consecutive: how many consecutive skips are tolerated before raising (>= 0).

    Returns:
        a transformer owning ``state.slots["skip_nonfinite"]`` (a :class:`SkipState`).

    Example:
        >>> import looplib as ll
        >>> ll.skip_nonfinite(3)
        skip_nonfinite(3)
    """
    limit = v.nonnegative_int("skip_nonfinite", "max_consecutive", max_consecutive)
    name = f"skip_nonfinite({limit})"

    def init(state: TrainState, loss: Metrics | None) -> TrainState:
        if SLOT in state.slots:
            return state
        device = state.step.device
        slot = SkipState(
            consecutive=torch.zeros((), dtype=torch.int64, device=device),
            total=torch.zeros((), dtype=torch.int64, device=device),
            last_step=torch.full((), -1, dtype=torch.int64, device=device),
        )
        return state._replace(slots={**state.slots, SLOT: slot})

    def wrap(inner: ApplyFn) -> ApplyFn:
        def apply(state: TrainState, micro: Micro) -> TrainState:
            ok = all_finite(micro.grads) & torch.isfinite(micro.metrics["loss"]).all()
            slot: SkipState = state.slots[SLOT]

            def good(state: TrainState, micro: Micro) -> TrainState:
                fresh = slot._replace(consecutive=torch.zeros_like(slot.consecutive))
                return inner(state._replace(slots={**state.slots, SLOT: fresh}), micro)

            def bad(state: TrainState, micro: Micro) -> TrainState:
                counted = SkipState(slot.consecutive + 1, slot.total + 1, state.step.clone())
                return state._replace(slots={**state.slots, SLOT: counted})

            return branch(ok, good, bad, state, micro)

        return apply

    def check(state: TrainState) -> None:
        slot: SkipState = state.slots[SLOT]
        consecutive = int(slot.consecutive.max())
        if consecutive > limit:
            raise NonFiniteGradientError(
                f"{name}: {consecutive} consecutive non-finite gradients, the last at step "
                f"{int(slot.last_step.max())} (optimizer updates applied so far); the error's "
                ".state holds the last good params. Lower the learning rate, check the data, "
                "or raise max_consecutive.",
                state,
            )

    return stage_transformer(Stage(name, wrap, init=init, slot=SLOT, check=check, holds=True))
