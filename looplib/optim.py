"""Pure optimizers: SGD, Adam and AdamW as ``(init, update)`` pairs that follow ``torch.optim``.

Each factory checks its hyperparameters at once and returns an :class:`~looplib._types.Optimizer`.
``init(params)`` builds a NamedTuple state; ``update(grads, opt_state, params)`` returns new
parameters and a new state of the same structure, never writing into its inputs. The update has
no host synchronisation and no Python branch on a tensor, so ``torch.compile(update,
fullgraph=True)`` captures it as one graph.

``update`` allocates its outputs (new parameters and moments) and a few temporaries, and otherwise
works in place on buffers it has just allocated. ``update_(grads, opt_state,
params)`` runs the very same operations written into the given ``params`` and ``opt_state``
(which the caller donates), so it gives the same values to the last bit without allocating a
new state; only ``grads`` is left untouched. Being in place, it is not differentiable.

The learning rate is either a number or a schedule: a callable of the update count ``count`` (a
0-d ``int64`` tensor, the number of updates applied *before* this one, so 0 for the first) that
returns a number or a 0-d tensor. This is ``LambdaLR``'s convention: ``torch.optim`` with its
learning rate set to ``schedule(t)`` before its ``t``-th step (counting from 0) takes the same
steps. Note that ``0.9 ** count`` is computed in the default dtype (usually float32); write
``0.9 ** count.double()`` for a float64 schedule.

``update`` is differentiable in the ``torch.autograd`` sense. Pass parameters that do not require
grad (or call it under ``torch.no_grad()``) unless you mean to differentiate through the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeAlias

import torch

from . import _validate
from ._checkpoint import register_checkpoint_type
from ._types import Optimizer, Params, Tensor

__all__ = ["AdamState", "SgdState", "adam", "adamw", "sgd"]

LearningRate: TypeAlias = "float | Callable[[Tensor], float | Tensor]"
Tensors: TypeAlias = "list[Tensor] | tuple[Tensor, ...]"

_LR_RULE = (
    "must be a non-negative finite real number or a schedule (a callable of the update count)"
)
_BETAS_RULE = "must be a pair of real numbers (beta1, beta2), each in [0, 1)"
_KEYS_FIX = (
    "Pass one gradient per parameter, under the same keys as params "
    "(zeros for a parameter the loss does not use)."
)


@register_checkpoint_type
class SgdState(NamedTuple):
    """The state of :func:`sgd`.

    Attributes:
        count: number of updates applied so far, a 0-d ``int64`` tensor.
        momentum: the momentum buffers, keyed like ``params``; an empty dict when
            ``momentum == 0``.
    """

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax's states
    momentum: dict[str, Tensor]


@register_checkpoint_type
class AdamState(NamedTuple):
    """The state of :func:`adam` and :func:`adamw`.

    Attributes:
        count: number of updates applied so far, a 0-d ``int64`` tensor.
        mu: first-moment estimates (``exp_avg`` in ``torch.optim``), keyed like ``params``.
        nu: second-moment estimates (``exp_avg_sq``), keyed like ``params``.
    """

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax's states
    mu: dict[str, Tensor]
    nu: dict[str, Tensor]


# --------------------------------------------------------------------------- argument checks


def _check_lr(func: str, lr: Any) -> LearningRate:
    if callable(lr):
        return lr
    x = _validate.real(func, "lr", lr, _LR_RULE)
    if not (math.isfinite(x) and x >= 0):
        _validate.fail(func, "lr", _LR_RULE, lr)
    return x


def _check_betas(func: str, betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        _validate.fail(func, "betas", _BETAS_RULE, betas, exc=TypeError)
    out = []
    for i, b in enumerate(betas):
        if not _validate._is_real(b):
            _validate.fail(
                func, "betas", _BETAS_RULE, betas, f"betas[{i}] is not a real number.", TypeError
            )
        if not 0.0 <= float(b) < 1.0:
            _validate.fail(func, "betas", _BETAS_RULE, betas, f"betas[{i}]={b!r} is out of range.")
        out.append(float(b))
    return out[0], out[1]


def _check_bool(func: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _validate.fail(func, arg, "must be a bool", value, exc=TypeError)
    return value


def _check_keys(func: str, grads: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    # Compares dict keys only (no tensor is read), so torch.compile keeps it as a guard.
    if grads.keys() != params.keys():
        missing = [k for k in params if k not in grads]
        extra = [k for k in grads if k not in params]
        _validate.fail(
            f"{func}.update",
            "grads",
            "must have the same keys as params",
            list(grads),
            f"Missing: {missing}; unexpected: {extra}. {_KEYS_FIX}",
        )


# --------------------------------------------------------------------------- shared helpers


def _init_count(params: Params) -> Tensor:
    device = next(iter(params.values())).device if params else torch.device("cpu")
    return torch.zeros((), dtype=torch.int64, device=device)


def _groups(params: Params) -> list[list[str]]:
    """Parameter keys grouped by (device, dtype), each group in ``params`` order."""
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for key, p in params.items():
        groups.setdefault((p.device, p.dtype), []).append(key)
    return list(groups.values())


def _scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for per-step scalars (bias corrections, step sizes) of a parameter group."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _lr_now(lr: LearningRate, count: Tensor) -> float | Tensor:
    return lr(count) if callable(lr) else lr


def _on(x: float | Tensor, device: torch.device, dtype: torch.dtype) -> float | Tensor:
    return x.to(device=device, dtype=dtype) if isinstance(x, Tensor) else x


def _add_scaled(target: Tensors, updates: Tensors, scale: float | Tensor) -> Tensors:
    """``target[i] += scale * updates[i]`` in place, rounding like ``p + scale * u``.

    Returns ``target``. A tensor ``scale`` costs one temporary per parameter.
    """
    if isinstance(scale, Tensor):
        torch._foreach_add_(target, torch._foreach_mul(updates, scale))
    else:
        torch._foreach_add_(target, updates, alpha=scale)
    return target


def _plus_scaled(base: Tensors, updates: Tensors, scale: float | Tensor) -> Tensors:
    """``[b + scale * u for b, u in zip(base, updates)]`` in fresh tensors, bitwise as
    :func:`_add_scaled` (addition commutes exactly, so ``u * s + b`` equals ``b + u * s``)."""
    if isinstance(scale, Tensor):
        out = torch._foreach_mul(updates, scale)
        torch._foreach_add_(out, base)
        return out
    return torch._foreach_add(base, updates, alpha=scale)


# --------------------------------------------------------------------------- SGD


def sgd(
    lr: LearningRate,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> Optimizer:
    """Stochastic gradient descent with optional momentum, as ``torch.optim.SGD``.

    For each parameter ``p`` with gradient ``g``, at update count ``t`` (0 for the first)::

        g = g + weight_decay * p
        b = g if t == 0 else momentum * b + (1 - dampening) * g   # only if momentum > 0
        g = g + momentum * b if nesterov else b                   # only if momentum > 0
        p = p - lr(t) * g

    Args:
        lr: learning rate, a non-negative finite number or a schedule ``count -> lr``.
        momentum: momentum factor, non-negative; 0 keeps no buffers.
        dampening: dampening for momentum, a finite real number.
        weight_decay: L2 penalty added to the gradient, non-negative.
        nesterov: use Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.

    Returns:
        An ``Optimizer(init, update, update_)`` whose state is an :class:`SgdState`.

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
    lr = _check_lr(name, lr)
    momentum = _validate.nonnegative(name, "momentum", momentum)
    dampening = _validate.finite(name, "dampening", dampening)
    weight_decay = _validate.nonnegative(name, "weight_decay", weight_decay)
    nesterov = _check_bool(name, "nesterov", nesterov)
    if nesterov and (momentum <= 0 or dampening != 0):
        _validate.fail(
            name,
            "nesterov",
            "requires momentum > 0 and dampening == 0",
            nesterov,
            f"Received momentum={momentum!r}, dampening={dampening!r}; "
            "set momentum > 0 and dampening=0, or pass nesterov=False.",
        )

    def init(params: Params) -> SgdState:
        buffers = {k: torch.zeros_like(p) for k, p in params.items()} if momentum else {}
        return SgdState(count=_init_count(params), momentum=buffers)

    def group(
        ps: Tensors, gs: Tensors, bs: Tensors, first: Tensor, step: float | Tensor, inplace: bool
    ) -> tuple[Tensors, Tensors]:
        # One rule for both forms: the same ops in the same order, so ``update`` and ``update_``
        # agree bitwise; ``inplace`` only says whether ``ps`` and ``bs`` may be written.
        if weight_decay:
            gs = torch._foreach_add(gs, ps, alpha=weight_decay)
        if momentum:
            if inplace:
                torch._foreach_mul_(bs, momentum)
            else:
                bs = torch._foreach_mul(bs, momentum)
            torch._foreach_add_(bs, gs, alpha=1 - dampening)
            # torch.optim starts the buffer as the gradient itself; ``where`` picks it without
            # reading ``count`` on the host. (``out=`` has no autograd, so only the in-place form
            # uses it.)
            if inplace:
                for g, b in zip(gs, bs, strict=True):
                    torch.where(first, g, b, out=b)
            else:
                bs = [torch.where(first, g, b) for g, b in zip(gs, bs, strict=True)]
            gs = torch._foreach_add(gs, bs, alpha=momentum) if nesterov else bs
        neg_step = -step
        ps = _add_scaled(ps, gs, neg_step) if inplace else _plus_scaled(ps, gs, neg_step)
        return ps, bs

    def apply(
        grads: Params, opt_state: SgdState, params: Params, inplace: bool
    ) -> tuple[Params, Params, Tensor]:
        _check_keys(name, grads, params)
        count = opt_state.count
        lr_t = _lr_now(lr, count)
        first = count == 0
        new_params: Params = {}
        new_buffers: dict[str, Tensor] = {}
        for keys in _groups(params):
            p0 = params[keys[0]]
            bs: Tensors = [opt_state.momentum[k] for k in keys] if momentum else []
            ps, bs = group(
                [params[k] for k in keys],
                [grads[k] for k in keys],
                bs,
                first.to(p0.device),
                _on(lr_t, p0.device, _scalar_dtype(p0.dtype)),
                inplace,
            )
            new_params.update(zip(keys, ps, strict=True))
            if momentum:
                new_buffers.update(zip(keys, bs, strict=True))
        return new_params, new_buffers, count

    def update(grads: Params, opt_state: SgdState, params: Params) -> tuple[Params, SgdState]:
        new_params, new_buffers, count = apply(grads, opt_state, params, inplace=False)
        buffers = {k: new_buffers[k] for k in params} if momentum else {}
        return {k: new_params[k] for k in params}, SgdState(count=count + 1, momentum=buffers)

    def update_(grads: Params, opt_state: SgdState, params: Params) -> tuple[Params, SgdState]:
        _, _, count = apply(grads, opt_state, params, inplace=True)
        count.add_(1)
        return params, opt_state

    return Optimizer(init, update, update_)


# --------------------------------------------------------------------------- Adam / AdamW


def _adam(
    name: str,
    lr: Any,
    betas: Any,
    eps: Any,
    weight_decay: Any,
    decoupled: bool,
) -> Optimizer:
    lr = _check_lr(name, lr)
    b1, b2 = _check_betas(name, betas)
    eps = _validate.nonnegative(name, "eps", eps)
    weight_decay = _validate.nonnegative(name, "weight_decay", weight_decay)

    def init(params: Params) -> AdamState:
        return AdamState(
            count=_init_count(params),
            mu={k: torch.zeros_like(p) for k, p in params.items()},
            nu={k: torch.zeros_like(p) for k, p in params.items()},
        )

    def scalars(t: Tensor, lr_g: float | Tensor) -> tuple[Tensor, Tensor, float | Tensor | None]:
        """``-lr / bc1``, ``sqrt(bc2)`` and the decoupled decay factor.

        Six 0-d ops (two more for a scheduled decoupled decay); a number ``lr`` stays a number.

        ``lr / (b1**t - 1)`` is ``-(lr / (1 - b1**t))`` exactly (IEEE negation is exact), and
        ``torch.div`` with a number first divides once, where ``number / tensor`` would take a
        reciprocal and then multiply (two ops, two roundings).
        """
        neg_step = torch.div(lr_g, torch.pow(b1, t).sub_(1))
        bc2_sqrt = (1 - torch.pow(b2, t)).sqrt_()
        decay = 1 - lr_g * weight_decay if decoupled and weight_decay else None
        return neg_step, bc2_sqrt, decay

    def group(
        ps: Tensors,
        gs: Tensors,
        ms: Tensors,
        vs: Tensors,
        t: Tensor,
        lr_g: float | Tensor,
        inplace: bool,
    ) -> tuple[Tensors, Tensors, Tensors]:
        # torch.optim's order of operations (foreach=False; foreach=True rounds alike), each
        # buffer allocated once and then written in place. ``inplace`` only says whether ``ps``, ``ms`` and ``vs`` may be written; the
        # same ops run either way, so ``update`` and ``update_`` agree bitwise.
        neg_step, bc2_sqrt, decay = scalars(t, lr_g)
        if weight_decay and not decoupled:
            gs = torch._foreach_add(gs, ps, alpha=weight_decay)
        if inplace:
            torch._foreach_lerp_(ms, gs, 1 - b1)
            torch._foreach_mul_(vs, b2)
        else:
            ms = torch._foreach_lerp(ms, gs, 1 - b1)
            vs = torch._foreach_mul(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        # ``(-step * m) / denom``, then added to ``p``: ATen's addcdiv rounds the same way.
        delta = torch._foreach_mul(ms, neg_step)
        torch._foreach_div_(delta, denom)
        del denom
        if decay is not None:
            # torch.optim decays first; nothing above reads ``ps`` in this branch, so decaying
            # last gives the same values and lets the decayed copy reuse ``denom``'s memory.
            if inplace:
                torch._foreach_mul_(ps, decay)
            else:
                ps = torch._foreach_mul(ps, decay)
            torch._foreach_add_(ps, delta)
        elif inplace:
            torch._foreach_add_(ps, delta)
        else:
            torch._foreach_add_(delta, ps)  # ``delta + p`` is ``p + delta`` to the last bit
            ps = delta
        return ps, ms, vs

    def apply(
        grads: Params, opt_state: AdamState, params: Params, inplace: bool
    ) -> tuple[Params, dict[str, Tensor], dict[str, Tensor], Tensor]:
        _check_keys(name, grads, params)
        count = opt_state.count
        lr_t = _lr_now(lr, count)
        count_next = count + 1
        new_params: Params = {}
        new_mu: dict[str, Tensor] = {}
        new_nu: dict[str, Tensor] = {}
        for keys in _groups(params):
            p0 = params[keys[0]]
            sdtype = _scalar_dtype(p0.dtype)
            ps, ms, vs = group(
                [params[k] for k in keys],
                [grads[k] for k in keys],
                [opt_state.mu[k] for k in keys],
                [opt_state.nu[k] for k in keys],
                count_next.to(device=p0.device, dtype=sdtype),
                _on(lr_t, p0.device, sdtype),
                inplace,
            )
            new_params.update(zip(keys, ps, strict=True))
            new_mu.update(zip(keys, ms, strict=True))
            new_nu.update(zip(keys, vs, strict=True))
        return new_params, new_mu, new_nu, count_next

    def update(grads: Params, opt_state: AdamState, params: Params) -> tuple[Params, AdamState]:
        new_params, new_mu, new_nu, count_next = apply(grads, opt_state, params, inplace=False)
        state = AdamState(
            count=count_next,
            mu={k: new_mu[k] for k in params},
            nu={k: new_nu[k] for k in params},
        )
        return {k: new_params[k] for k in params}, state

    def update_(grads: Params, opt_state: AdamState, params: Params) -> tuple[Params, AdamState]:
        *_, count_next = apply(grads, opt_state, params, inplace=True)
        opt_state.count.copy_(count_next)
        return params, opt_state

    return Optimizer(init, update, update_)


def adam(
    lr: LearningRate = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> Optimizer:
    """Adam with L2 weight decay added to the gradient, as ``torch.optim.Adam``.

    For each parameter ``p`` with gradient ``g``, at update count ``t`` (0 for the first)::

        g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        p = p - (lr(t) / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)

    Args:
        lr: learning rate, a non-negative finite number or a schedule ``count -> lr``.
        betas: decay rates ``(b1, b2)`` of the two moment estimates, each in [0, 1).
        eps: non-negative term added to the denominator.
        weight_decay: L2 penalty added to the gradient, non-negative.

    Returns:
        An ``Optimizer(init, update, update_)`` whose state is an :class:`AdamState`.

    Example:
        >>> import torch
        >>> opt = adam(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.update({"w": torch.tensor([3.0, -0.5])}, state, params)
        >>> params["w"], state.count
        (tensor([0.9000, 2.1000]), tensor(1))
    """
    return _adam("adam", lr, betas, eps, weight_decay, decoupled=False)


def adamw(
    lr: LearningRate = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> Optimizer:
    """Adam with decoupled weight decay, as ``torch.optim.AdamW``.

    The same update as :func:`adam` without the L2 term in ``g``; instead, before the Adam step::

        p = p * (1 - lr(t) * weight_decay)

    Args:
        lr: learning rate, a non-negative finite number or a schedule ``count -> lr``.
        betas: decay rates ``(b1, b2)`` of the two moment estimates, each in [0, 1).
        eps: non-negative term added to the denominator.
        weight_decay: decoupled decay rate, non-negative.

    Returns:
        An ``Optimizer(init, update, update_)`` whose state is an :class:`AdamState`.

    Example:
        >>> import torch
        >>> opt = adamw(lr=0.1, weight_decay=0.5)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.update({"w": torch.tensor([0.0, 0.0])}, state, params)
        >>> params["w"]
        tensor([0.9500, 1.9000])
    """
    return _adam("adamw", lr, betas, eps, weight_decay, decoupled=True)
