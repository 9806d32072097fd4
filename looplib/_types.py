"""The state pytree and the small types every other module speaks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeAlias

import torch

Tensor: TypeAlias = torch.Tensor
Params: TypeAlias = dict[str, Tensor]
"""A flat dict of tensors keyed by the module's parameter names (``"0.weight"``)."""
Metrics: TypeAlias = dict[str, Tensor]
History: TypeAlias = "list[dict[str, float]]"
Schedule: TypeAlias = Callable[[Tensor], "float | Tensor"]
"""A function of the optimizer's update count (a 0-d int64 tensor) to a value."""


class TrainState(NamedTuple):
    """Everything training needs, as one pytree of tensors.

    A ``NamedTuple`` is a pytree node for ``optree`` and ``torch.utils._pytree`` without any
    registration, so ``optree.tree_map`` and friends work on a state out of the box.

    Attributes:
        params: trainable tensors, keyed by ``module.named_parameters()`` names.
        buffers: non-trainable tensors (e.g. BatchNorm running statistics), keyed by
            ``module.named_buffers()`` names.
        opt_state: the optimizer's state pytree (moments, update count).
        step: number of optimizer updates applied so far, a 0-d ``int64`` tensor.
        metrics: the latest step's metrics, as tensors (never Python floats).
        slots: state owned by transformers, one entry per transformer, keyed by its slot name
            (e.g. ``slots["accumulate"]``); nobody else writes an entry.
    """

    params: Params
    buffers: Params
    opt_state: Any
    step: Tensor
    metrics: Metrics
    slots: dict[str, Any]


class Optimizer(NamedTuple):
    """A pure optimizer: a pair of functions, in the manner of optax.

    ``init(params) -> opt_state`` builds the optimizer state for a dict of parameters.
    ``update(grads, opt_state, params) -> (new_params, new_opt_state)`` applies one update out
    of place: it never writes into ``grads``, ``opt_state`` or ``params``.
    ``update_(grads, opt_state, params) -> (params, opt_state)``, optional (``None`` where an
    optimizer has no such form), is the same update written into the given ``params`` and
    ``opt_state`` tensors, which the caller donates: it will not use them again. It returns the
    same objects, never writes into ``grads``, and saves the memory and time of allocating a new
    state. Being in place, it is not differentiable: parameters that require grad need
    ``torch.no_grad()``.
    ``hyperparams(opt_state) -> {"lr": tensor, ...}``, optional, gives the hyperparameters the
    last update used (before the first update: those it will use) as 0-d tensors, computed from
    ``opt_state`` alone (no host reads); the step reports them in ``state.metrics`` after every
    update, so the history and the loggers have the learning rate with no user code.
    """

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params], tuple[Params, Any]]
    update_: Callable[[Params, Any, Params], tuple[Params, Any]] | None = None
    hyperparams: Callable[[Any], dict[str, Tensor]] | None = None


def describe(value: Any, limit: int = 80) -> str:
    """A short ``repr`` of a received value, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_mapping(value: Any) -> bool:
    return isinstance(value, Mapping)
