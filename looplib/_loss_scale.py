"""``loss_scale``: dynamic loss scaling, as ``torch.amp.GradScaler``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _ops
from . import _validate as v
from ._checkpoint import register_checkpoint_type
from ._step import ApplyFn, Micro, Stage, Step, branch
from ._transform import Transformer, stage_transformer
from ._types import Metrics, Params, Tensor, TrainState

SLOT = "loss_scale"
METRIC = "loss_scale"

WINDOW_AFTER = (
    "must not have {name} after loss_scale in its chain (GradScaler keeps one scale through a "
    "window and checks the window's summed gradient once)"
)


@register_checkpoint_type
class LossScaleState(NamedTuple):
    """The ``loss_scale`` slot: the current ``scale`` (float32) and ``growth_tracker`` (int32),
    the count of consecutive applied updates since the scale last changed, as in
    ``GradScaler``'s ``_scale`` and ``_growth_tracker``."""

    scale: Tensor
    growth_tracker: Tensor


def all_finite_elements(grads: Params) -> Tensor:
    """A 0-d bool tensor: no element of any gradient is inf or NaN (element by element, so a
    sum of large finite values that would overflow is still finite; no host sync)."""
    values = list(grads.values())
    if not values:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(g).all() for g in values]).all()


def update_scale(
    slot: LossScaleState,
    found_inf: Tensor,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
) -> LossScaleState:
    """``torch._amp_update_scale_``, out of place and as tensor selects::

        if found_inf:
            scale, tracker = scale * backoff_factor, 0
        elif tracker + 1 == growth_interval:
            scale = scale * growth_factor if isfinite(scale * growth_factor) else scale
            tracker = 0
        else:
            tracker = tracker + 1

    The products are taken in float64 and rounded to float32, as ATen's kernel does.
    """
    scale = slot.scale.to(torch.float64)
    successful = slot.growth_tracker + 1
    grow = successful == growth_interval
    grown = (scale * growth_factor).to(torch.float32)
    grown = torch.where(grow & torch.isfinite(grown), grown, slot.scale)
    backed = (scale * backoff_factor).to(torch.float32)
    zero = torch.zeros_like(successful)
    return LossScaleState(
        scale=torch.where(found_inf, backed, grown),
        growth_tracker=torch.where(found_inf | grow, zero, successful),
    )


def loss_scale(
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
) -> Transformer:
    """Dynamic loss scaling: ``torch.amp.GradScaler``'s rules, as a transformer.

    The loss is multiplied by the current scale before the backward pass (low-precision
    gradients then keep small values from flushing to zero). At this stage the gradient is
    unscaled (times ``1 / scale``, rounded to float32 as ``GradScaler.unscale_`` does) and
    checked element by element; then, per update::

        if any gradient element is inf or NaN:       # the update is skipped
            scale *= backoff_factor; tracker = 0     # params, optimizer state, step untouched
        else:
            apply the unscaled gradient (the stages after this one, then the optimizer)
            tracker += 1
            if tracker == growth_interval:
                scale *= growth_factor (unless that overflows float32); tracker = 0

    which is ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``. As with
    ``GradScaler``, a non-finite loss whose gradient is finite is not skipped (put
    ``skip_nonfinite()`` after this stage for that). ``state.metrics["loss_scale"]`` holds the
    scale after the update, and ``state.slots["loss_scale"]`` the scale and growth tracker.

    Where it stands: first among the gradient transformers, or right after ``accumulate``::

        chain(accumulate(K), loss_scale(), clip(1.0))

    accumulates the scaled gradients of K micro-batches, unscales their weighted mean once,
    skips the whole window if any micro-batch overflowed and updates the scale once per update,
    as ``GradScaler`` does under gradient accumulation; ``clip``, ``track_norm`` and the others
    after it see the unscaled gradient. ``loss_scale`` before ``accumulate`` raises. Do not put
    a gradient transformer *before* it (but ``accumulate``, which is linear): it would see the
    scaled gradient (a limit of the stage interface: a stage cannot see the stages put before
    it, so this order cannot be rejected when the chain is built).

    Args:
        init_scale: the first scale, a positive finite number.
        growth_factor: the factor the scale grows by, a finite number > 1.
        backoff_factor: the factor the scale shrinks by on overflow, in (0, 1).
        growth_interval: consecutive applied updates before the scale grows, a positive int.

    Returns:
        a transformer owning ``state.slots["loss_scale"]`` (a :class:`LossScaleState`).

    Example:
        >>> import looplib as ll
        >>> ll.loss_scale()
        loss_scale(65536.0)
    """
    func = "loss_scale"
    init_scale = v.positive(func, "init_scale", init_scale)
    if init_scale > torch.finfo(torch.float32).max:
        v.fail(func, "init_scale", "must be a positive number below float32's max", init_scale)
    growth_factor = v.finite(func, "growth_factor", growth_factor)
    if growth_factor <= 1.0:
        v.fail(func, "growth_factor", "must be a finite real number > 1", growth_factor)
    backoff_factor = v.in_range(func, "backoff_factor", backoff_factor, 0.0, 1.0, closed="()")
    growth_interval = v.positive_int(func, "growth_interval", growth_interval)
    defaults = (2.0**16, 2.0, 0.5, 2000)
    args = [repr(init_scale)] + [
        f"{k}={x!r}"
        for k, x, d in zip(
            ("growth_factor", "backoff_factor", "growth_interval"),
            (growth_factor, backoff_factor, growth_interval),
            defaults[1:],
            strict=True,
        )
        if x != d
    ]
    name = f"loss_scale({', '.join(args)})"

    def init(state: TrainState, loss: Metrics | None) -> TrainState:
        device = state.step.device
        if SLOT not in state.slots:
            slot = LossScaleState(
                scale=torch.full((), init_scale, dtype=torch.float32, device=device),
                growth_tracker=torch.zeros((), dtype=torch.int32, device=device),
            )
            state = state._replace(slots={**state.slots, SLOT: slot})
        if METRIC not in state.metrics:
            # Its own tensor: a leaf aliased with the slot's would make a compiled step retrace.
            value = state.slots[SLOT].scale.clone()
            state = state._replace(metrics={**state.metrics, METRIC: value})
        return state

    def scale(state: TrainState) -> Tensor:
        current: Tensor = state.slots[SLOT].scale
        return current

    def wrap(inner: ApplyFn) -> ApplyFn:
        def apply(state: TrainState, micro: Micro) -> TrainState:
            slot: LossScaleState = state.slots[SLOT]
            found_inf = ~all_finite_elements(micro.grads)
            new = update_scale(slot, found_inf, growth_factor, backoff_factor, growth_interval)
            # GradScaler.unscale_: the reciprocal in float64, rounded to float32.
            inv = slot.scale.to(torch.float64).reciprocal().to(torch.float32)
            grads = dict(zip(micro.grads, _ops.mul(list(micro.grads.values()), inv), strict=True))
            state = state._replace(
                slots={**state.slots, SLOT: new},
                metrics={**state.metrics, METRIC: new.scale.clone()},
            )

            def good(state: TrainState, micro: Micro) -> TrainState:
                return inner(state, micro._replace(grads=grads, norms=None))

            def skip(state: TrainState, micro: Micro) -> TrainState:
                return state

            return branch(found_inf, skip, good, state, micro)

        return apply

    stage = Stage(name, wrap, init=init, slot=SLOT, holds=True, scale=scale)

    def transform(step: Step) -> Step:
        for after in step.stages:
            if after.window > 1:
                v.fail(
                    name,
                    "step",
                    WINDOW_AFTER.format(name=after.name),
                    step,
                    fix=f"Put loss_scale right after it: chain({after.name}, {name}, ...).",
                )
        return stage_transformer(stage)(step)

    return Transformer(name, transform)
