"""``ema``: an exponential moving average of the params, kept in the state."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _ops
from . import _validate as v
from ._checkpoint import register_checkpoint_type
from ._step import ApplyFn, Micro, Stage, Step
from ._transform import Transformer, stage_transformer
from ._types import Metrics, Params, Tensor, TrainState

SLOT = "ema"

NO_EMA = (
    "{func}(state): the state has no moving average (no slot 'ema'). Put ll.ema(decay) in the "
    "step's chain and complete the state with it: step.init(state, batch), or run a step."
)
HELD_AFTER = (
    "must not have {name} after ema in its chain (an update it holds back would never reach "
    "the average, and a window it applies at a flush would bypass it)"
)


@register_checkpoint_type
class EmaState(NamedTuple):
    """The ``ema`` slot: the averaged params (keyed like ``state.params``) and ``count``, the
    number of updates averaged so far (``AveragedModel.n_averaged``)."""

    params: Params
    count: Tensor  # type: ignore[assignment]  # shadows tuple.count, as NamedTuple fields may


def _average(slot: EmaState, params: Params, weight: float, inplace: bool) -> EmaState:
    """``AveragedModel.update_parameters`` with ``get_ema_multi_avg_fn``: a copy on the first
    update, then ``ema = lerp(ema, p, 1 - decay)`` (torch's rounding)."""
    first = slot.count == 0
    old, new = list(slot.params.values()), list(params.values())
    if inplace:  # the state is donated: write the average into its own tensors
        avg = _ops.where_(first, new, _ops.lerp_(old, new, weight))
    else:
        avg = _ops.where(first, new, _ops.lerp(old, new, weight))
    return EmaState(dict(zip(slot.params, avg, strict=True)), slot.count + 1)


def ema(decay: float) -> Transformer:
    """Keep an exponential moving average of the params, updated after every applied update.

    The average lives in ``state.slots["ema"]`` (an :class:`EmaState`), so it is saved, resumed,
    compiled and vmapped (each ensemble member its own) with the rest of the state. It follows
    ``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``
    with ``update_parameters(model)`` called after every optimizer step, bit for bit::

        ema = copy(params)                        # at init
        count = 0
        # after each update that is actually applied:
        ema = params if count == 0 else lerp(ema, params, 1 - decay)
        count += 1

    Only updates that are applied count: a micro-batch held by ``accumulate``, a gradient
    dropped by ``skip_nonfinite`` or ``loss_scale`` leaves the average alone. So ``ema`` stands
    after every transformer that may hold an update back, last in a chain is simplest:
    ``chain(accumulate(K), skip_nonfinite(), clip(1.0), ema(0.999))``; a chain with
    ``accumulate``, ``skip_nonfinite`` or ``loss_scale`` after ``ema`` raises.

    Buffers (BatchNorm's running statistics) are not averaged: :func:`with_ema_params` pairs the
    averaged params with the state's current buffers (``AveragedModel(use_buffers=False)``
    copies them from the model at each update, which is the same after every applied update).

    Args:
        decay: the weight of the old average, in [0, 1] (0: the params themselves).

    Returns:
        a transformer owning ``state.slots["ema"]``. Read the average with :func:`ema_params`;
        evaluate with it through :func:`with_ema_params`.

    Example:
        >>> import looplib as ll
        >>> ll.ema(0.999)
        ema(0.999)
    """
    decay = v.in_range("ema", "decay", decay, 0.0, 1.0)
    name = f"ema({decay!r})"
    weight = 1.0 - decay  # the lerp weight get_ema_multi_avg_fn passes

    def init(state: TrainState, loss: Metrics | None) -> TrainState:
        if SLOT in state.slots:
            return state
        slot = EmaState(
            params={k: p.detach().clone() for k, p in state.params.items()},
            count=torch.zeros((), dtype=torch.int64, device=state.step.device),
        )
        return state._replace(slots={**state.slots, SLOT: slot})

    def wrap(inner: ApplyFn) -> ApplyFn:
        # Nothing after this stage holds an update back (checked when the chain is built), so
        # every call of inner applies one: average the params it returns.
        def apply(state: TrainState, micro: Micro) -> TrainState:
            state = inner(state, micro)
            slot = _average(state.slots[SLOT], state.params, weight, micro.inplace)
            return state._replace(slots={**state.slots, SLOT: slot})

        return apply

    stage = Stage(name, wrap, init=init, slot=SLOT)

    def transform(step: Step) -> Step:
        for after in step.stages:
            if after.window > 1 or after.holds:
                v.fail(
                    name,
                    "step",
                    HELD_AFTER.format(name=after.name),
                    step,
                    fix=f"Put ema last: chain(..., {after.name}, ..., {name}).",
                )
        return stage_transformer(stage)(step)

    return Transformer(name, transform)


def _check(func: str, state: object) -> EmaState:
    slot = v.train_state(func, state).slots.get(SLOT)
    if not isinstance(slot, EmaState):
        raise ValueError(NO_EMA.format(func=func))
    return slot


def ema_params(state: TrainState) -> Params:
    """The moving average of the params kept by :func:`ema`: a dict keyed like ``state.params``.

    The tensors are the state's own (not copies); under :func:`vmap` each has the ensemble axis.

    Example:
        >>> import looplib as ll, torch
        >>> model, opt = torch.nn.Linear(2, 1), ll.optim.sgd(0.1)
        >>> step = ll.ema(0.9)(ll.train_step(model, lambda m, b: m(b).pow(2).mean(), opt))
        >>> state = step(ll.init(model, opt), torch.ones(4, 2))
        >>> sorted(ll.ema_params(state)) == sorted(state.params)
        True
    """
    return dict(_check("ema_params", state).params)


def with_ema_params(state: TrainState) -> TrainState:
    """``state`` with its params replaced by their moving average (see :func:`ema`).

    For evaluation: ``ll.evaluate(step, ll.with_ema_params(state), val_batches)`` or
    ``step.evaluate(ll.with_ema_params(state), batch)``. The buffers are the state's own. Train
    on the state itself, never on this one: its params are the average.
    """
    return state._replace(params=dict(_check("with_ema_params", state).params))
