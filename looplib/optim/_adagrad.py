"""Adagrad, as ``torch.optim.Adagrad``."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .. import _ops as ops
from .. import _validate
from .._checkpoint import register_checkpoint_type
from .._types import Optimizer, Tensor
from . import _checks
from . import _core as core
from ._checks import Hyper


class AdagradState(NamedTuple):
    """The state of :func:`adagrad`.

    Attributes:
        count: number of updates applied so far, a 0-d ``int64`` tensor.
        sum_of_squares: running sums of ``g * g`` (``sum`` in ``torch.optim``), keyed like
            ``params``, starting at ``initial_accumulator_value``.
    """

    count: Tensor  # type: ignore[assignment]
    sum_of_squares: dict[str, Tensor]


register_checkpoint_type(AdagradState, name="looplib.optim.AdagradState")


@_checks.hyperparameters_only
def adagrad(
    lr: Hyper = 1e-2,
    lr_decay: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: Hyper = 1e-10,
    *,
    maximize: bool = False,
    mask: Any = None,
) -> Optimizer:
    """Adagrad, as ``torch.optim.Adagrad`` (dense gradients).

    For each parameter ``p`` with gradient ``g``, at update count ``t`` (0 for the first)::

        g = -g if maximize else g
        g = g + weight_decay * p                  # where mask(p)
        s = s + g * g                             # s starts at initial_accumulator_value
        p = p - lr(t) / (1 + t * lr_decay) * g / (sqrt(s) + eps)

    Args:
        lr: learning rate, a non-negative finite number or a schedule.
        lr_decay: non-negative learning-rate decay.
        weight_decay: L2 penalty added to the gradient, non-negative.
        initial_accumulator_value: the starting value of ``s``, a non-negative number (used at
            ``init`` only, so not a schedule).
        eps: non-negative term added to the denominator.
        maximize: ascend the objective instead of descending it.
        mask: which parameters are decayed: a dict ``{name: bool}`` naming every parameter, or
            a callable ``(name, param) -> bool``; ``None`` decays all.

    Returns:
        An ``Optimizer(init, update, update_, hyperparams)`` whose state is an
        :class:`AdagradState`.

    Example:
        >>> import torch
        >>> opt = adagrad(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> params, state = opt.update({"w": torch.tensor([3.0, -0.5])}, opt.init(params), params)
        >>> params["w"]
        tensor([0.9000, 2.1000])
    """
    name = "adagrad"
    hyper = {
        "lr": _checks.lr(name, lr),
        "lr_decay": _checks.hyper(name, "lr_decay", lr_decay, _validate.nonnegative),
        "weight_decay": _checks.hyper(name, "weight_decay", weight_decay, _validate.nonnegative),
        "eps": _checks.hyper(name, "eps", eps, _validate.nonnegative),
    }
    initial = _validate.nonnegative(name, "initial_accumulator_value", initial_accumulator_value)
    maximize = _checks.boolean(name, "maximize", maximize)

    def kernel(ps, gs, bufs, h, c):
        # torch.optim's foreach order of operations.
        minus_clr = torch.div(-h["lr"], 1 + (c.step - 1) * h["lr_decay"])
        if maximize:
            gs = ops.neg(gs)
        if not core.is_off(h["weight_decay"]):
            gs = ops.add(gs, ps, alpha=h["weight_decay"])
        s = bufs["sum_of_squares"]
        s = ops.addcmul_(s, gs, gs, 1) if c.inplace else ops.addcmul(s, gs, gs, 1)
        std = ops.add_(ops.sqrt(s), h["eps"])
        delta = ops.div_(ops.mul(gs, minus_clr), std)  # addcdiv(p, g * minus_clr, std)
        return core.add_delta(ps, delta, c.inplace), {"sum_of_squares": s}

    return core.build(
        name,
        AdagradState,
        kernel,
        hyper=hyper,
        buffers={"sum_of_squares": lambda p: torch.full_like(p, initial)},
        decay="weight_decay",
        mask=mask,
    )
