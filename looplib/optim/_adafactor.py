"""Adafactor, as ``torch.optim.Adafactor``."""

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


class AdafactorState(NamedTuple):
    """The state of :func:`adafactor` (field names as in ``torch.optim.Adafactor``'s state).

    Attributes:
        count: number of updates applied so far, a 0-d ``int64`` tensor.
        row_var: for each parameter with more than one dimension, the row factor of the second
            moment (the last dimension reduced to 1).
        col_var: for the same parameters, the column factor (the next-to-last dimension
            reduced to 1).
        variance: for each parameter with at most one dimension, the full second moment.
    """

    count: Tensor  # type: ignore[assignment]
    row_var: dict[str, Tensor]
    col_var: dict[str, Tensor]
    variance: dict[str, Tensor]


register_checkpoint_type(AdafactorState, name="looplib.optim.AdafactorState")


def _factor(p: Tensor, dim: int) -> Tensor | None:
    if p.dim() <= 1:
        return None
    shape = list(p.shape)
    shape[dim] = 1
    return p.new_zeros(shape)


def _check_eps(func: str, eps: Any) -> tuple[Hyper | None, Hyper]:
    rule = "must be a pair (eps1, eps2): eps1 None or a non-negative number, eps2 non-negative"
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        _validate.fail(func, "eps", rule, eps, exc=TypeError)
    eps1 = None if eps[0] is None else _checks.hyper(func, "eps", eps[0], _validate.nonnegative)
    eps2 = _checks.hyper(func, "eps", eps[1], _validate.nonnegative)
    return eps1, eps2


@_checks.hyperparameters_only
def adafactor(
    lr: Hyper = 1e-2,
    beta2_decay: Hyper = -0.8,
    eps: tuple[Hyper | None, Hyper] = (None, 1e-3),
    d: Hyper = 1.0,
    weight_decay: Hyper = 0.0,
    *,
    maximize: bool = False,
    mask: Any = None,
) -> Optimizer:
    """Adafactor, as ``torch.optim.Adafactor`` (its ``foreach`` arithmetic).

    For each parameter ``p`` with gradient ``g``, at update count ``t`` (``s = t + 1``)::

        g = -g if maximize else g
        beta2_t = 1 - s ** beta2_decay
        rho = min(lr(t), 1 / sqrt(s))
        alpha = max(eps2, norm(p) / sqrt(numel(p))) * rho
        p = p * (1 - lr(t) * weight_decay)                   # where mask(p)
        if p.dim() > 1:   # factored second moment over the last two dimensions
            R = beta2_t * R + (1 - beta2_t) * mean(g * g, dim=-1)
            C = beta2_t * C + (1 - beta2_t) * mean(g * g, dim=-2)
            v = R @ C / max(mean(R, dim=-2), eps1)
        else:
            v = V = beta2_t * V + (1 - beta2_t) * g * g
        u = g / sqrt(max(v, eps1 * eps1))
        p = p - alpha / max(1, norm(u) / (sqrt(numel(u)) * d)) * u

    ``eps1=None`` is the machine epsilon of the parameters' dtype. ``torch.optim.Adafactor`` reads
    the norms on the host (``.item()``); here they stay 0-d tensors.

    Args:
        lr: the learning rate, capping the relative step ``1 / sqrt(s)``; a non-negative number
            or a schedule.
        beta2_decay: the exponent of the second moment's decay, non-positive.
        eps: ``(eps1, eps2)``: ``eps1`` (None or non-negative) bounds the second moment below,
            ``eps2`` (non-negative) bounds the parameter scale below.
        d: the update clipping threshold, at least 1.
        weight_decay: decoupled decay rate, non-negative.
        maximize: ascend the objective instead of descending it.
        mask: which parameters are decayed: a dict ``{name: bool}`` naming every parameter, or
            a callable ``(name, param) -> bool``; ``None`` decays all.

    Returns:
        An ``Optimizer(init, update, update_, hyperparams)`` whose state is an
        :class:`AdafactorState`.

    Example:
        >>> import torch
        >>> opt = adafactor(lr=0.01)
        >>> params = {"w": torch.ones(2, 3)}
        >>> params, state = opt.update({"w": torch.ones(2, 3)}, opt.init(params), params)
        >>> params["w"]
        tensor([[0.9900, 0.9900, 0.9900],
                [0.9900, 0.9900, 0.9900]])
    """
    name = "adafactor"
    eps1, eps2 = _check_eps(name, eps)
    hyper: dict[str, Hyper] = {
        "lr": _checks.lr(name, lr),
        "beta2_decay": _checks.hyper(
            name,
            "beta2_decay",
            beta2_decay,
            lambda f, a, v: _validate.in_range(f, a, v, -float("inf"), 0.0, closed="(]"),
        ),
        "d": _checks.hyper(
            name,
            "d",
            d,
            lambda f, a, v: _validate.in_range(f, a, v, 1.0, float("inf"), closed="[)"),
        ),
        "eps2": eps2,
        "weight_decay": _checks.hyper(name, "weight_decay", weight_decay, _validate.nonnegative),
    }
    if eps1 is not None:
        hyper["eps1"] = eps1
    maximize = _checks.boolean(name, "maximize", maximize)

    def kernel(ps, gs, bufs, h, c):
        inplace, lr_t, d_t, s = c.inplace, h["lr"], h["d"], c.step
        e1 = h.get("eps1", torch.finfo(c.param_dtype).eps)
        if maximize:
            gs = ops.neg(gs)
        one_minus_beta2 = core.pow(s, h["beta2_decay"])
        inv_sqrt = torch.reciprocal(core.pow(s, 0.5))
        rho = (
            torch.clamp(inv_sqrt, max=lr_t)
            if not isinstance(lr_t, Tensor)
            else torch.minimum(lr_t, inv_sqrt)
        )
        alphas = [
            torch.clamp(n / (p.numel() ** 0.5), min=h["eps2"]) * rho
            for n, p in zip(ops.norm(ps), ps, strict=True)
        ]
        if not core.is_off(h["weight_decay"]):
            decay = 1 - lr_t * h["weight_decay"]
            ps = ops.mul_(ps, decay) if inplace else ops.mul(ps, decay)
            fresh = True
        else:
            fresh = inplace
        out: dict[str, list[Tensor]] = {"row_var": [], "col_var": [], "variance": []}
        if bufs["row_var"]:
            rows, cols = bufs["row_var"], bufs["col_var"]
            row_means = [torch.norm(g, dim=-1, keepdim=True) for g in gs]
            ops.mul_(row_means, row_means)
            ops.div_(row_means, [g.size(-1) for g in gs])
            rows = (
                ops.lerp_(rows, row_means, one_minus_beta2)
                if inplace
                else ops.lerp(rows, row_means, one_minus_beta2)
            )
            del row_means
            col_means = [torch.norm(g, dim=-2, keepdim=True) for g in gs]
            ops.mul_(col_means, col_means)
            ops.div_(col_means, [g.size(-2) for g in gs])
            cols = (
                ops.lerp_(cols, col_means, one_minus_beta2)
                if inplace
                else ops.lerp(cols, col_means, one_minus_beta2)
            )
            del col_means
            var_estimates = [r @ col for r, col in zip(rows, cols, strict=True)]
            row_var_means = [r.mean(dim=-2, keepdim=True) for r in rows]
            ops.clamp_min_(row_var_means, e1)
            ops.div_(var_estimates, row_var_means)
            out["row_var"], out["col_var"] = rows, cols
        else:
            vs = bufs["variance"]
            g2 = ops.mul(gs, gs)
            vs = (
                ops.lerp_(vs, g2, one_minus_beta2) if inplace else ops.lerp(vs, g2, one_minus_beta2)
            )
            del g2
            var_estimates = [v.clone() for v in vs]  # the update must not write into v
            out["variance"] = vs
        ops.clamp_min_(var_estimates, e1 * e1)
        ops.rsqrt_(var_estimates)
        updates = ops.mul_(var_estimates, gs)
        scales = [
            -a / torch.clamp(n / ((u.numel() ** 0.5) * d_t), min=1.0)
            for a, n, u in zip(alphas, ops.norm(updates), updates, strict=True)
        ]
        ops.mul_(updates, scales)
        return core.add_delta(ps, updates, fresh), out

    return core.build(
        name,
        AdafactorState,
        kernel,
        hyper=hyper,
        buffers={
            "row_var": lambda p: _factor(p, -1),
            "col_var": lambda p: _factor(p, -2),
            "variance": lambda p: torch.zeros_like(p) if p.dim() <= 1 else None,
        },
        decay="weight_decay",
        mask=mask,
        key=lambda p: p.dim() > 1,
    )
