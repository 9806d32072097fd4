"""SGD with momentum, as ``torch.optim.SGD``."""

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


class SgdState(NamedTuple):
    """The state of :func:`sgd`.

    Attributes:
        count: number of updates applied so far, a 0-d ``int64`` tensor.
        momentum: the momentum buffers, keyed like ``params``; an empty dict when
            ``momentum == 0``.
    """

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax's states
    momentum: dict[str, Tensor]


register_checkpoint_type(SgdState, name="looplib.optim.SgdState")  # its name before the split


@_checks.hyperparameters_only
def sgd(
    lr: Hyper,
    momentum: Hyper = 0.0,
    dampening: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
    mask: Any = None,
) -> Optimizer:
    """Stochastic gradient descent with optional momentum, as ``torch.optim.SGD``.

    For each parameter ``p`` with gradient ``g``, at update count ``t`` (0 for the first)::

        g = -g if maximize else g
        g = g + weight_decay * p                                  # where mask(p)
        b = g if t == 0 else momentum * b + (1 - dampening) * g   # only if momentum != 0
        g = g + momentum * b if nesterov else b                   # only if momentum != 0
        p = p - lr(t) * g

    Any float hyperparameter may be a schedule (a callable of the update count).

    Args:
        lr: learning rate, a non-negative finite number or a schedule ``count -> lr``.
        momentum: momentum factor, non-negative; 0 keeps no buffers (a schedule keeps them).
        dampening: dampening for momentum, a finite real number.
        weight_decay: L2 penalty added to the gradient, non-negative.
        nesterov: use Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.
        maximize: ascend the objective instead of descending it.
        mask: which parameters are decayed: a dict ``{name: bool}`` naming every parameter, or
            a callable ``(name, param) -> bool``; ``None`` decays all.

    Returns:
        An ``Optimizer(init, update, update_, hyperparams)`` whose state is an :class:`SgdState`.

    Example:
        >>> import torch
        >>> opt = sgd(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.update({"w": torch.tensor([1.0, -1.0])}, state, params)
        >>> params["w"], state.count
        (tensor([0.9000, 2.1000]), tensor(1))
    """
    name = "sgd"
    lr = _checks.lr(name, lr)
    momentum = _checks.hyper(name, "momentum", momentum, _validate.nonnegative)
    dampening = _checks.hyper(name, "dampening", dampening, _validate.finite)
    weight_decay = _checks.hyper(name, "weight_decay", weight_decay, _validate.nonnegative)
    nesterov = _checks.boolean(name, "nesterov", nesterov)
    maximize = _checks.boolean(name, "maximize", maximize)
    fixed = not callable(momentum) and not callable(dampening)
    if nesterov and fixed and (momentum <= 0 or dampening != 0):  # type: ignore[operator]
        _validate.fail(
            name,
            "nesterov",
            "requires momentum > 0 and dampening == 0",
            nesterov,
            f"Received momentum={momentum!r}, dampening={dampening!r}; "
            "set momentum > 0 and dampening=0, or pass nesterov=False.",
        )
    has_momentum = _checks.nonzero(momentum)

    def kernel(ps, gs, bufs, h, c):
        # torch.optim's foreach order of operations; ``c.inplace`` only says whether ``ps`` and
        # the buffers may be written, the same ops run either way.
        if maximize:
            gs = ops.neg(gs)
        if not core.is_off(h["weight_decay"]):
            gs = ops.add(gs, ps, alpha=h["weight_decay"])
        bs = bufs["momentum"]
        if has_momentum:
            m = h["momentum"]
            bs = ops.mul_(bs, m) if c.inplace else ops.mul(bs, m)
            ops.add_(bs, gs, alpha=1 - h["dampening"])
            # torch.optim starts the buffer as the gradient itself; ``where`` picks it without
            # reading ``count`` on the host.
            first = c.count == 0
            bs = ops.where_(first, gs, bs) if c.inplace else ops.where(first, gs, bs)
            gs = ops.add(gs, bs, alpha=m) if nesterov else bs
        lr_t = h["lr"]
        return core.add_scaled(ps, gs, -lr_t, c.inplace), {"momentum": bs}

    return core.build(
        name,
        SgdState,
        kernel,
        hyper={
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
        },
        buffers={"momentum": (lambda p: torch.zeros_like(p)) if has_momentum else (lambda p: None)},
        decay="weight_decay",
        mask=mask,
    )
