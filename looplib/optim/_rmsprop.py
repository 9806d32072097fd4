"""RMSprop, as ``torch.optim.RMSprop``."""

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


class RmspropState(NamedTuple):
    """The state of :func:`rmsprop` (field names as in ``torch.optim.RMSprop``'s state).

    Attributes:
        count: number of updates applied so far, a 0-d ``int64`` tensor.
        square_avg: running averages of ``g * g``, keyed like ``params``.
        momentum_buffer: momentum buffers, keyed like ``params``; empty when ``momentum == 0``.
        grad_avg: running averages of ``g``, keyed like ``params``; empty unless ``centered``.
    """

    count: Tensor  # type: ignore[assignment]
    square_avg: dict[str, Tensor]
    momentum_buffer: dict[str, Tensor]
    grad_avg: dict[str, Tensor]


register_checkpoint_type(RmspropState, name="looplib.optim.RmspropState")


@_checks.hyperparameters_only
def rmsprop(
    lr: Hyper = 1e-2,
    alpha: Hyper = 0.99,
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    momentum: Hyper = 0.0,
    centered: bool = False,
    *,
    maximize: bool = False,
    mask: Any = None,
) -> Optimizer:
    """RMSprop, as ``torch.optim.RMSprop``.

    For each parameter ``p`` with gradient ``g``, at update count ``t``::

        g = -g if maximize else g
        g = g + weight_decay * p                      # where mask(p)
        v = alpha * v + (1 - alpha) * g * g
        a = alpha * a + (1 - alpha) * g               # centered
        d = sqrt(v - a * a) + eps if centered else sqrt(v) + eps
        b = momentum * b + g / d                      # momentum != 0
        p = p - lr(t) * b if momentum != 0 else p - lr(t) * g / d

    Args:
        lr: learning rate, a non-negative finite number or a schedule.
        alpha: smoothing constant, in [0, 1].
        eps: non-negative term added to the denominator.
        weight_decay: L2 penalty added to the gradient, non-negative.
        momentum: momentum factor, non-negative; 0 keeps no buffers.
        centered: normalise by an estimate of the gradient's variance.
        maximize: ascend the objective instead of descending it.
        mask: which parameters are decayed: a dict ``{name: bool}`` naming every parameter, or
            a callable ``(name, param) -> bool``; ``None`` decays all.

    Returns:
        An ``Optimizer(init, update, update_, hyperparams)`` whose state is an
        :class:`RmspropState`.

    Example:
        >>> import torch
        >>> opt = rmsprop(lr=0.01)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> params, state = opt.update({"w": torch.tensor([1.0, -1.0])}, opt.init(params), params)
        >>> params["w"]
        tensor([0.9000, 2.1000])
    """
    name = "rmsprop"
    hyper = {
        "lr": _checks.lr(name, lr),
        "alpha": _checks.hyper(
            name, "alpha", alpha, lambda f, a, v: _validate.in_range(f, a, v, 0.0, 1.0)
        ),
        "eps": _checks.hyper(name, "eps", eps, _validate.nonnegative),
        "weight_decay": _checks.hyper(name, "weight_decay", weight_decay, _validate.nonnegative),
        "momentum": _checks.hyper(name, "momentum", momentum, _validate.nonnegative),
    }
    centered = _checks.boolean(name, "centered", centered)
    maximize = _checks.boolean(name, "maximize", maximize)
    has_momentum = _checks.nonzero(hyper["momentum"])

    def kernel(ps, gs, bufs, h, c):
        # torch.optim's foreach order of operations.
        inplace, alpha = c.inplace, h["alpha"]
        if maximize:
            gs = ops.neg(gs)
        if not core.is_off(h["weight_decay"]):
            gs = ops.add(gs, ps, alpha=h["weight_decay"])
        vs = ops.mul_(bufs["square_avg"], alpha) if inplace else ops.mul(bufs["square_avg"], alpha)
        ops.addcmul_(vs, gs, gs, 1 - alpha)
        out = {"square_avg": vs, "momentum_buffer": bufs["momentum_buffer"], "grad_avg": []}
        if centered:
            a = bufs["grad_avg"]
            a = ops.lerp_(a, gs, 1 - alpha) if inplace else ops.lerp(a, gs, 1 - alpha)
            out["grad_avg"] = a
            avg = ops.addcmul(vs, a, a, -1)
            ops.sqrt_(avg)
        else:
            avg = ops.sqrt(vs)
        ops.add_(avg, h["eps"])
        neg_lr = -h["lr"]
        if has_momentum:
            b = bufs["momentum_buffer"]
            b = ops.mul_(b, h["momentum"]) if inplace else ops.mul(b, h["momentum"])
            ops.addcdiv_(b, gs, avg)
            out["momentum_buffer"] = b
            return core.add_scaled(ps, b, neg_lr, inplace), out
        if inplace:
            return ops.addcdiv_(ps, gs, avg, neg_lr), out
        return ops.addcdiv(ps, gs, avg, neg_lr), out

    def zeros(p: Tensor) -> Tensor:
        return torch.zeros_like(p)

    return core.build(
        name,
        RmspropState,
        kernel,
        hyper=hyper,
        buffers={
            "square_avg": zeros,
            "momentum_buffer": zeros if has_momentum else (lambda p: None),
            "grad_avg": zeros if centered else (lambda p: None),
        },
        decay="weight_decay",
        mask=mask,
    )
