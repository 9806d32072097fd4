"""The Adam family, as ``torch.optim``: Adam, AdamW, Adamax, NAdam and RAdam.

Each kernel follows the order of operations of torch.optim's ``foreach`` implementation (its
``foreach=False`` path rounds alike for Adam, AdamW, Adamax and NAdam; RAdam's single-tensor
path is a different formula and agrees to about 1e-15). The per-step scalars (bias corrections,
step sizes) are 0-d tensors computed from ``count`` where torch.optim computes Python floats
from ``step.item()``, so they can differ from torch's in the last bit (``torch.pow`` against
Python's ``**``); trajectories agree to about 1e-15 in float64.
"""

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


class AdamState(NamedTuple):
    """The state of :func:`adam`, :func:`adamw` (without ``amsgrad``) and :func:`radam`.

    Attributes:
        count: number of updates applied so far, a 0-d ``int64`` tensor.
        mu: first-moment estimates (``exp_avg`` in ``torch.optim``), keyed like ``params``.
        nu: second-moment estimates (``exp_avg_sq``), keyed like ``params``.
    """

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax's states
    mu: dict[str, Tensor]
    nu: dict[str, Tensor]


class AmsgradState(NamedTuple):
    """The state of :func:`adam` and :func:`adamw` with ``amsgrad=True``.

    Attributes:
        count: number of updates applied so far, a 0-d ``int64`` tensor.
        mu: first-moment estimates (``exp_avg``), keyed like ``params``.
        nu: second-moment estimates (``exp_avg_sq``), keyed like ``params``.
        nu_max: the running maximum of ``nu`` (``max_exp_avg_sq``), keyed like ``params``.
    """

    count: Tensor  # type: ignore[assignment]
    mu: dict[str, Tensor]
    nu: dict[str, Tensor]
    nu_max: dict[str, Tensor]


class AdamaxState(NamedTuple):
    """The state of :func:`adamax`.

    Attributes:
        count: number of updates applied so far, a 0-d ``int64`` tensor.
        mu: first-moment estimates (``exp_avg``), keyed like ``params``.
        inf_norm: the exponentially weighted infinity norm (``exp_inf``), keyed like ``params``.
    """

    count: Tensor  # type: ignore[assignment]
    mu: dict[str, Tensor]
    inf_norm: dict[str, Tensor]


class NadamState(NamedTuple):
    """The state of :func:`nadam`.

    Attributes:
        count: number of updates applied so far, a 0-d ``int64`` tensor.
        mu_product: the product of the momentum coefficients so far, a 0-d tensor in torch's
            scalar dtype (float32, or float64 where that is the default dtype) as
            ``torch.optim.NAdam`` keeps it, so the two round alike.
        mu: first-moment estimates (``exp_avg``), keyed like ``params``.
        nu: second-moment estimates (``exp_avg_sq``), keyed like ``params``.
    """

    count: Tensor  # type: ignore[assignment]
    mu_product: Tensor
    mu: dict[str, Tensor]
    nu: dict[str, Tensor]


register_checkpoint_type(AdamState, name="looplib.optim.AdamState")  # its name before the split
register_checkpoint_type(AmsgradState, name="looplib.optim.AmsgradState")
register_checkpoint_type(AdamaxState, name="looplib.optim.AdamaxState")
register_checkpoint_type(NadamState, name="looplib.optim.NadamState")


def _zeros(p: Tensor) -> Tensor:
    return torch.zeros_like(p)


def _common(name: str, lr: Any, betas: Any, eps: Any, weight_decay: Any) -> dict[str, Hyper]:
    b1, b2 = _checks.betas(name, betas)
    return {
        "lr": _checks.lr(name, lr),
        "b1": b1,
        "b2": b2,
        "eps": _checks.hyper(name, "eps", eps, _validate.nonnegative),
        "weight_decay": _checks.hyper(name, "weight_decay", weight_decay, _validate.nonnegative),
    }


def _neg_step(lr: Any, b1: Any, t: Tensor) -> Tensor:
    """``-lr / (1 - b1 ** t)``, exactly: ``lr / (b1**t - 1)`` (IEEE negation is exact), and
    ``torch.div`` with a number first divides once, where ``number / tensor`` would take a
    reciprocal and then multiply (two roundings)."""
    return torch.div(lr, torch.pow(b1, t).sub_(1))


def _decay(ps: list[Tensor], gs: list[Tensor], h: dict[str, Any], decoupled: bool, inplace: bool):
    """Weight decay, torch.optim's way: ``p *= 1 - lr * wd`` (decoupled) or ``g += wd * p``."""
    wd = h["weight_decay"]
    if core.is_off(wd):
        return ps, gs
    if decoupled:
        decay = 1 - h["lr"] * wd
        return (ops.mul_(ps, decay) if inplace else ops.mul(ps, decay)), gs
    return ps, ops.add(gs, ps, alpha=wd)


def _adam(
    name: str,
    lr: Any,
    betas: Any,
    eps: Any,
    weight_decay: Any,
    amsgrad: Any,
    maximize: Any,
    mask: Any,
    decoupled: bool,
) -> Optimizer:
    hyper = _common(name, lr, betas, eps, weight_decay)
    amsgrad = _checks.boolean(name, "amsgrad", amsgrad)
    maximize = _checks.boolean(name, "maximize", maximize)

    def kernel(ps, gs, bufs, h, c):
        # torch.optim's order of operations, each buffer allocated once and then written in
        # place; ``c.inplace`` only says whether ``ps`` and the buffers may be written.
        b1, b2, inplace = h["b1"], h["b2"], c.inplace
        neg_step = _neg_step(h["lr"], b1, c.step)
        bc2_sqrt = core.pow(1 - torch.pow(b2, c.step), 0.5)
        if maximize:
            gs = ops.neg(gs)
        wd, decays = h["weight_decay"], not core.is_off(h["weight_decay"])
        if decays and not decoupled:
            gs = ops.add(gs, ps, alpha=wd)
        ms = ops.lerp_(bufs["mu"], gs, 1 - b1) if inplace else ops.lerp(bufs["mu"], gs, 1 - b1)
        vs = ops.mul_(bufs["nu"], b2) if inplace else ops.mul(bufs["nu"], b2)
        ops.addcmul_(vs, gs, gs, 1 - b2)
        out = {"mu": ms, "nu": vs}
        if amsgrad:
            vmax = bufs["nu_max"]
            vmax = ops.maximum_(vmax, vs) if inplace else ops.maximum(vmax, vs)
            out["nu_max"] = vmax
            denom = ops.sqrt(vmax)
        else:
            denom = ops.sqrt(vs)
        ops.div_(denom, bc2_sqrt)
        ops.add_(denom, h["eps"])
        # ``(-step * m) / denom``, then added to ``p``: ATen's addcdiv rounds the same way.
        delta = ops.mul(ms, neg_step)
        ops.div_(delta, denom)
        del denom
        if decays and decoupled:
            # torch.optim decays first; nothing above reads ``ps`` in this branch, so decaying
            # last gives the same values.
            decay = 1 - h["lr"] * wd
            ps = ops.mul_(ps, decay) if inplace else ops.mul(ps, decay)
            ops.add_(ps, delta)
        else:
            ps = core.add_delta(ps, delta, inplace)
        return ps, out

    buffers: dict[str, core.BufferInit] = {"mu": _zeros, "nu": _zeros}
    if amsgrad:
        buffers["nu_max"] = _zeros
    return core.build(
        name,
        AmsgradState if amsgrad else AdamState,
        kernel,
        hyper=hyper,
        buffers=buffers,
        decay="weight_decay",
        mask=mask,
    )


@_checks.hyperparameters_only
def adam(
    lr: Hyper = 1e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    mask: Any = None,
) -> Optimizer:
    """Adam with L2 weight decay added to the gradient, as ``torch.optim.Adam``.

    For each parameter ``p`` with gradient ``g``, at update count ``t`` (0 for the first)::

        g = -g if maximize else g
        g = g + weight_decay * p                  # where mask(p)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        v_max = max(v_max, v)                     # amsgrad; then v_max replaces v below
        bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        p = p - (lr(t) / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)

    Args:
        lr: learning rate, a non-negative finite number or a schedule ``count -> lr``.
        betas: decay rates ``(b1, b2)`` of the two moment estimates, each in [0, 1) (or a
            schedule).
        eps: non-negative term added to the denominator.
        weight_decay: L2 penalty added to the gradient, non-negative.
        amsgrad: use the running maximum of ``v`` (the state is then an :class:`AmsgradState`).
        maximize: ascend the objective instead of descending it.
        mask: which parameters are decayed: a dict ``{name: bool}`` naming every parameter, or
            a callable ``(name, param) -> bool``; ``None`` decays all.

    Returns:
        An ``Optimizer(init, update, update_, hyperparams)`` whose state is an
        :class:`AdamState` (:class:`AmsgradState` with ``amsgrad``).

    Example:
        >>> import torch
        >>> opt = adam(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.update({"w": torch.tensor([3.0, -0.5])}, state, params)
        >>> params["w"], state.count
        (tensor([0.9000, 2.1000]), tensor(1))
    """
    return _adam("adam", lr, betas, eps, weight_decay, amsgrad, maximize, mask, decoupled=False)


@_checks.hyperparameters_only
def adamw(
    lr: Hyper = 1e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    mask: Any = None,
) -> Optimizer:
    """Adam with decoupled weight decay, as ``torch.optim.AdamW``.

    The same update as :func:`adam` without the L2 term in ``g``; instead, before the Adam step,
    where ``mask(p)``::

        p = p * (1 - lr(t) * weight_decay)

    ``adamw(1e-3, weight_decay=0.1, mask=lambda name, p: p.dim() >= 2)`` decays matrices and
    embeddings but not biases and norms (nanoGPT's two parameter groups).

    Args:
        lr: learning rate, a non-negative finite number or a schedule ``count -> lr``.
        betas: decay rates ``(b1, b2)`` of the two moment estimates, each in [0, 1).
        eps: non-negative term added to the denominator.
        weight_decay: decoupled decay rate, non-negative.
        amsgrad: use the running maximum of ``v`` (the state is then an :class:`AmsgradState`).
        maximize: ascend the objective instead of descending it.
        mask: which parameters are decayed (see :func:`adam`).

    Returns:
        An ``Optimizer(init, update, update_, hyperparams)`` whose state is an
        :class:`AdamState` (:class:`AmsgradState` with ``amsgrad``).

    Example:
        >>> import torch
        >>> opt = adamw(lr=0.1, weight_decay=0.5)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.update({"w": torch.tensor([0.0, 0.0])}, state, params)
        >>> params["w"]
        tensor([0.9500, 1.9000])
    """
    return _adam("adamw", lr, betas, eps, weight_decay, amsgrad, maximize, mask, decoupled=True)


@_checks.hyperparameters_only
def adamax(
    lr: Hyper = 2e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    *,
    maximize: bool = False,
    mask: Any = None,
) -> Optimizer:
    """Adamax (Adam with an infinity norm), as ``torch.optim.Adamax``.

    For each parameter ``p`` with gradient ``g``, at update count ``t`` (0 for the first)::

        g = -g if maximize else g
        g = g + weight_decay * p                  # where mask(p)
        m = b1 * m + (1 - b1) * g
        u = max(b2 * u, |g| + eps)
        p = p - (lr(t) / (1 - b1 ** (t + 1))) * m / u

    Args:
        lr: learning rate, a non-negative finite number or a schedule.
        betas: ``(b1, b2)``, each in [0, 1).
        eps: non-negative term added to ``|g|``.
        weight_decay: L2 penalty added to the gradient, non-negative.
        maximize: ascend the objective instead of descending it.
        mask: which parameters are decayed (see :func:`adam`).

    Returns:
        An ``Optimizer(init, update, update_, hyperparams)`` whose state is an
        :class:`AdamaxState`.

    Example:
        >>> import torch
        >>> opt = adamax(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> params, state = opt.update({"w": torch.tensor([3.0, -0.5])}, opt.init(params), params)
        >>> params["w"]
        tensor([0.9000, 2.1000])
    """
    name = "adamax"
    hyper = _common(name, lr, betas, eps, weight_decay)
    maximize = _checks.boolean(name, "maximize", maximize)

    def kernel(ps, gs, bufs, h, c):
        inplace = c.inplace
        neg_step = _neg_step(h["lr"], h["b1"], c.step)
        if maximize:
            gs = ops.neg(gs)
        if not core.is_off(h["weight_decay"]):
            gs = ops.add(gs, ps, alpha=h["weight_decay"])
        ms, us = bufs["mu"], bufs["inf_norm"]
        ms = ops.lerp_(ms, gs, 1 - h["b1"]) if inplace else ops.lerp(ms, gs, 1 - h["b1"])
        us = ops.mul_(us, h["b2"]) if inplace else ops.mul(us, h["b2"])
        g_abs = ops.add_(ops.abs(gs), h["eps"])
        ops.maximum_(us, g_abs)
        delta = ops.mul(ms, neg_step)  # torch's addcdiv(p, m, u, -step): p + (-step * m) / u
        ops.div_(delta, us)
        return core.add_delta(ps, delta, inplace), {"mu": ms, "inf_norm": us}

    return core.build(
        name,
        AdamaxState,
        kernel,
        hyper=hyper,
        buffers={"mu": _zeros, "inf_norm": _zeros},
        decay="weight_decay",
        mask=mask,
    )


def _torch_scalar_dtype() -> torch.dtype:
    # torch.optim keeps ``step`` and NAdam's ``mu_product`` in this dtype.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


@_checks.hyperparameters_only
def nadam(
    lr: Hyper = 2e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    momentum_decay: Hyper = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
    mask: Any = None,
) -> Optimizer:
    """NAdam (Adam with Nesterov momentum), as ``torch.optim.NAdam``.

    For each parameter ``p`` with gradient ``g``, at update count ``t`` (``s = t + 1``)::

        g = -g if maximize else g
        p = p * (1 - lr * weight_decay)           # decoupled_weight_decay, where mask(p)
        g = g + weight_decay * p                  # otherwise, where mask(p)
        mu      = b1 * (1 - 0.5 * 0.96 ** (s * momentum_decay))
        mu_next = b1 * (1 - 0.5 * 0.96 ** ((s + 1) * momentum_decay))
        mu_product = mu_product * mu
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        d = sqrt(v) / sqrt(1 - b2 ** s) + eps
        p = p - lr * (1 - mu) / (1 - mu_product) * g / d
        p = p - lr * mu_next / (1 - mu_product * mu_next) * m / d

    Args:
        lr: learning rate, a non-negative finite number or a schedule.
        betas: ``(b1, b2)``, each in [0, 1).
        eps: non-negative term added to the denominator.
        weight_decay: weight decay, non-negative.
        momentum_decay: non-negative ``momentum_decay`` (psi in the paper).
        decoupled_weight_decay: decay the parameters as AdamW does instead of adding an L2 term.
        maximize: ascend the objective instead of descending it.
        mask: which parameters are decayed (see :func:`adam`).

    Returns:
        An ``Optimizer(init, update, update_, hyperparams)`` whose state is a
        :class:`NadamState`.
    """
    name = "nadam"
    hyper = _common(name, lr, betas, eps, weight_decay)
    hyper["momentum_decay"] = _checks.hyper(
        name, "momentum_decay", momentum_decay, _validate.nonnegative
    )
    decoupled = _checks.boolean(name, "decoupled_weight_decay", decoupled_weight_decay)
    maximize = _checks.boolean(name, "maximize", maximize)

    def mu_at(b1: Any, md: Any, s: Tensor) -> Tensor:
        return b1 * (1.0 - 0.5 * torch.pow(0.96, s * md))

    def init_mu_product(device: torch.device) -> Tensor:
        return torch.ones((), dtype=_torch_scalar_dtype(), device=device)

    def advance(mu_product: Tensor, h: dict[str, Any], count: Tensor) -> Tensor:
        # torch.optim multiplies its stored product by a Python float: ``mu`` rounded to the
        # product's dtype.
        s = (count + 1).to(torch.float64)
        b1, md = (
            core.on(h["b1"], s.device, s.dtype),
            core.on(h["momentum_decay"], s.device, s.dtype),
        )
        return mu_product * mu_at(b1, md, s).to(mu_product.dtype)

    def kernel(ps, gs, bufs, h, c):
        inplace, b1, b2, lr_t, s = c.inplace, h["b1"], h["b2"], h["lr"], c.step
        mu = mu_at(b1, h["momentum_decay"], s)
        mu_next = mu_at(b1, h["momentum_decay"], s + 1)
        mu_product = c.scalars["mu_product"].to(c.dtype)
        bc2_sqrt = core.pow(1 - torch.pow(b2, s), 0.5)
        step_g = (lr_t * (1.0 - mu) / (1.0 - mu_product)).neg_()
        step_m = (lr_t * mu_next / (1.0 - mu_product * mu_next)).neg_()
        if maximize:
            gs = ops.neg(gs)
        ps, gs = _decay(ps, gs, h, decoupled, inplace)
        ms = ops.lerp_(bufs["mu"], gs, 1 - b1) if inplace else ops.lerp(bufs["mu"], gs, 1 - b1)
        vs = ops.mul_(bufs["nu"], b2) if inplace else ops.mul(bufs["nu"], b2)
        ops.addcmul_(vs, gs, gs, 1 - b2)
        denom = ops.sqrt(vs)
        ops.div_(denom, bc2_sqrt)
        ops.add_(denom, h["eps"])
        delta = ops.div_(ops.mul(gs, step_g), denom)  # addcdiv(p, g, d, step_g)
        ps = core.add_delta(ps, delta, inplace or _decayed_copy(h, decoupled))
        delta = ops.div_(ops.mul(ms, step_m), denom)  # addcdiv(p, m, d, step_m)
        ops.add_(ps, delta)
        return ps, {"mu": ms, "nu": vs}

    return core.build(
        name,
        NadamState,
        kernel,
        hyper=hyper,
        buffers={"mu": _zeros, "nu": _zeros},
        scalars={"mu_product": (init_mu_product, advance)},
        decay="weight_decay",
        mask=mask,
    )


@_checks.hyperparameters_only
def radam(
    lr: Hyper = 1e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
    mask: Any = None,
) -> Optimizer:
    """RAdam (rectified Adam), as ``torch.optim.RAdam``.

    For each parameter ``p`` with gradient ``g``, at update count ``t`` (``s = t + 1``)::

        g = -g if maximize else g
        p = p * (1 - lr * weight_decay)           # decoupled_weight_decay, where mask(p)
        g = g + weight_decay * p                  # otherwise, where mask(p)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * s * b2 ** s / (1 - b2 ** s)
        if rho > 5:   # a tensor ``where``, no host branch
            r = sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            p = p - lr * r * sqrt(1 - b2 ** s) / (1 - b1 ** s) * m / (sqrt(v) + eps)
        else:
            p = p - lr / (1 - b1 ** s) * m

    Args:
        lr: learning rate, a non-negative finite number or a schedule.
        betas: ``(b1, b2)``, each in [0, 1).
        eps: non-negative term added to the denominator.
        weight_decay: weight decay, non-negative.
        decoupled_weight_decay: decay the parameters as AdamW does instead of adding an L2 term.
        maximize: ascend the objective instead of descending it.
        mask: which parameters are decayed (see :func:`adam`).

    Returns:
        An ``Optimizer(init, update, update_, hyperparams)`` whose state is an
        :class:`AdamState`.
    """
    name = "radam"
    hyper = _common(name, lr, betas, eps, weight_decay)
    decoupled = _checks.boolean(name, "decoupled_weight_decay", decoupled_weight_decay)
    maximize = _checks.boolean(name, "maximize", maximize)

    def kernel(ps, gs, bufs, h, c):
        inplace, b1, b2, lr_t, s = c.inplace, h["b1"], h["b2"], h["lr"], c.step
        # torch.optim's foreach arithmetic, on 0-d tensors instead of Python floats.
        rho_inf = 2 / (1 - b2) - 1
        b2s = torch.pow(b2, s)
        rho = rho_inf - 2 * s * b2s / (1 - b2s)
        rect = torch.where(
            rho > 5,
            core.pow((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho), 0.5),
            0.0,
        )
        unrectified = (rect <= 0).to(rect.dtype)  # torch: 0 if rect > 0 else 1.0
        bc1 = 1 - torch.pow(b1, s)
        unrect_step = (lr_t * unrectified / bc1) * -1
        bc2 = core.pow(1 - b2s, 0.5) * (lr_t * rect / bc1) * -1
        if maximize:
            gs = ops.neg(gs)
        ps, gs = _decay(ps, gs, h, decoupled, inplace)
        ms = ops.lerp_(bufs["mu"], gs, 1 - b1) if inplace else ops.lerp(bufs["mu"], gs, 1 - b1)
        vs = ops.mul_(bufs["nu"], b2) if inplace else ops.mul(bufs["nu"], b2)
        ops.addcmul_(vs, gs, gs, 1 - b2)
        buf = ops.sqrt(vs)
        ops.add_(buf, h["eps"])
        ops.div_(buf, bc2)
        ops.reciprocal_(buf)
        ops.add_(buf, unrect_step)
        # p + m * buf, where buf = bc2 / (sqrt(v) + eps) + unrect_step
        if inplace or _decayed_copy(h, decoupled):
            ops.addcmul_(ps, ms, buf)
        else:
            ps = ops.addcmul(ps, ms, buf)
        return ps, {"mu": ms, "nu": vs}

    return core.build(
        name,
        AdamState,
        kernel,
        hyper=hyper,
        buffers={"mu": _zeros, "nu": _zeros},
        decay="weight_decay",
        mask=mask,
    )


def _decayed_copy(h: dict[str, Any], decoupled: bool) -> bool:
    """Whether :func:`_decay` already gave fresh parameter tensors (decoupled decay ran)."""
    return decoupled and not core.is_off(h["weight_decay"])
