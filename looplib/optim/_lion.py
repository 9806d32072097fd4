"""Lion (evolved sign momentum), as in the paper's pseudo-code."""

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


class LionState(NamedTuple):
    """The state of :func:`lion`.

    Attributes:
        count: number of updates applied so far, a 0-d ``int64`` tensor.
        mu: the momentum, keyed like ``params``.
    """

    count: Tensor  # type: ignore[assignment]
    mu: dict[str, Tensor]


register_checkpoint_type(LionState, name="looplib.optim.LionState")


@_checks.hyperparameters_only
def lion(
    lr: Hyper = 1e-4,
    betas: tuple[Hyper, Hyper] = (0.9, 0.99),
    weight_decay: Hyper = 0.0,
    *,
    maximize: bool = False,
    mask: Any = None,
) -> Optimizer:
    """Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    For each parameter ``p`` with gradient ``g``, at update count ``t``::

        g = -g if maximize else g
        c = b1 * m + (1 - b1) * g
        p = p - lr(t) * (sign(c) + weight_decay * p)   # the decay term where mask(p)
        m = b2 * m + (1 - b2) * g

    Lion's update has the same size in every coordinate, so it wants a learning rate 3-10x
    smaller than AdamW's and a weight decay 3-10x larger.

    Args:
        lr: learning rate, a non-negative finite number or a schedule.
        betas: ``(b1, b2)``, each in [0, 1).
        weight_decay: decoupled decay rate, non-negative.
        maximize: ascend the objective instead of descending it.
        mask: which parameters are decayed: a dict ``{name: bool}`` naming every parameter, or
            a callable ``(name, param) -> bool``; ``None`` decays all.

    Returns:
        An ``Optimizer(init, update, update_, hyperparams)`` whose state is a
        :class:`LionState`.

    Example:
        >>> import torch
        >>> opt = lion(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> params, state = opt.update({"w": torch.tensor([3.0, -0.5])}, opt.init(params), params)
        >>> params["w"]
        tensor([0.9000, 2.1000])
    """
    name = "lion"
    b1, b2 = _checks.betas(name, betas)
    hyper = {
        "lr": _checks.lr(name, lr),
        "b1": b1,
        "b2": b2,
        "weight_decay": _checks.hyper(name, "weight_decay", weight_decay, _validate.nonnegative),
    }
    maximize = _checks.boolean(name, "maximize", maximize)

    def kernel(ps, gs, bufs, h, c):
        b1, b2, ms = h["b1"], h["b2"], bufs["mu"]
        if maximize:
            gs = ops.neg(gs)
        u = ops.add_(ops.mul(ms, b1), gs, alpha=1 - b1)  # c = b1 * m + (1 - b1) * g
        ops.sign_(u)
        if not core.is_off(h["weight_decay"]):
            ops.add_(u, ps, alpha=h["weight_decay"])
        ps = core.add_scaled(ps, u, -h["lr"], c.inplace)
        ms = ops.mul_(ms, b2) if c.inplace else ops.mul(ms, b2)
        ops.add_(ms, gs, alpha=1 - b2)
        return ps, {"mu": ms}

    return core.build(
        name,
        LionState,
        kernel,
        hyper=hyper,
        buffers={"mu": lambda p: torch.zeros_like(p)},
        decay="weight_decay",
        mask=mask,
    )
