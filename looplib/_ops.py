"""List operations: ``torch._foreach_*`` with a per-tensor fallback under vmap.

Every optimizer kernel and gradient transformer works on lists of tensors (one list per parameter group) through these
functions and never calls ``torch._foreach_*`` itself. Each function runs the ``foreach`` op,
except where one of its tensor arguments is a functorch ``BatchedTensor`` (inside
``torch.func.vmap``, e.g. an ensemble whose state leaves are stacked on a leading axis): the
``_foreach_*`` ops have no batching rule, so there it runs the same op tensor by tensor. This is
the one place that knows about vmap; no other optimizer code branches on it, nor on
``torch.compiler.is_compiling()``.

The two forms give the same bits: on CPU the ``foreach`` ops loop over the very same per-tensor
kernels, and the tests check it op by op.

A scalar argument is a Python number or a 0-d tensor (a scheduled hyperparameter). A tensor
scalar goes where ATen takes a tensor (``mul``, ``div``, ``add`` without ``alpha``); where ATen
takes only a number (``alpha=``, ``value=``, the ``lerp`` weight of ``_foreach_lerp``) a tensor
scalar is applied by an explicit multiplication, which rounds as the fused form does
(``x + (y * s) * z`` is ``x + s * y * z`` to the bit), except that CPU kernels may fuse
``x + alpha * y`` into one rounding where the tensor form rounds twice.

In-place forms (trailing ``_``) write into their first list and return it, so a kernel can write
``ms = ops.mul_(ms, b) if inplace else ops.mul(ms, b)``. Where an in-place ATen op has no batching
rule either (``lerp_``, ``addcmul_``, ``addcdiv_``, ``clamp_``, ``maximum`` with ``out=``), the
batched form computes out of place with the same kernel and copies the result in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import torch
from torch._C._functorch import is_batchedtensor

Tensor: TypeAlias = torch.Tensor
Tensors: TypeAlias = "list[Tensor]"
Scalar: TypeAlias = "float | Tensor"

__all__ = [
    "abs",
    "abs_",
    "add",
    "add_",
    "addcdiv",
    "addcdiv_",
    "addcmul",
    "addcmul_",
    "clamp_min",
    "clamp_min_",
    "copy_",
    "div",
    "div_",
    "is_batched",
    "lerp",
    "lerp_",
    "maximum",
    "maximum_",
    "mul",
    "mul_",
    "neg",
    "norm",
    "reciprocal_",
    "rsqrt_",
    "sign",
    "sign_",
    "sqrt",
    "sqrt_",
    "where",
    "where_",
]


def _batched(x: object) -> bool:
    if isinstance(x, (list, tuple)):
        x = x[0] if x else None
    return isinstance(x, Tensor) and is_batchedtensor(x)


def is_batched(*args: object) -> bool:
    """Whether any argument (a tensor, or a list judged by its first tensor) is batched by vmap."""
    return any(_batched(a) for a in args)


def _each(other: Any, n: int) -> Sequence[Any]:
    return other if isinstance(other, (list, tuple)) else [other] * n


# --------------------------------------------------------------------------- unary


def neg(xs: Tensors) -> Tensors:
    """``[-x for x in xs]``."""
    if is_batched(xs):
        return [torch.neg(x) for x in xs]
    return list(torch._foreach_neg(xs))


def abs(xs: Tensors) -> Tensors:
    """``[x.abs() for x in xs]``."""
    if is_batched(xs):
        return [torch.abs(x) for x in xs]
    return list(torch._foreach_abs(xs))


def abs_(xs: Tensors) -> Tensors:
    if is_batched(xs):
        for x in xs:
            x.abs_()
    else:
        torch._foreach_abs_(xs)
    return xs


def sign(xs: Tensors) -> Tensors:
    """``[x.sign() for x in xs]``."""
    if is_batched(xs):
        return [torch.sign(x) for x in xs]
    return list(torch._foreach_sign(xs))


def sign_(xs: Tensors) -> Tensors:
    if is_batched(xs):
        for x in xs:
            x.sign_()
    else:
        torch._foreach_sign_(xs)
    return xs


def sqrt(xs: Tensors) -> Tensors:
    """``[x.sqrt() for x in xs]``."""
    if is_batched(xs):
        return [torch.sqrt(x) for x in xs]
    return list(torch._foreach_sqrt(xs))


def sqrt_(xs: Tensors) -> Tensors:
    if is_batched(xs):
        for x in xs:
            x.sqrt_()
    else:
        torch._foreach_sqrt_(xs)
    return xs


def rsqrt_(xs: Tensors) -> Tensors:
    """``x = 1 / sqrt(x)`` in place (ATen's ``rsqrt``)."""
    if is_batched(xs):
        for x in xs:
            x.rsqrt_()
    else:
        torch._foreach_rsqrt_(xs)
    return xs


def reciprocal_(xs: Tensors) -> Tensors:
    if is_batched(xs):
        for x in xs:
            x.reciprocal_()
    else:
        torch._foreach_reciprocal_(xs)
    return xs


def norm(xs: Tensors, p: float = 2.0) -> Tensors:
    """The p-norm of each tensor, as 0-d tensors."""
    if is_batched(xs):
        return [torch.linalg.vector_norm(x, p) for x in xs]
    return list(torch._foreach_norm(xs, p))


# --------------------------------------------------------------------------- binary


def _scaled(other: Scalar | Tensors, alpha: Scalar) -> tuple[Scalar | Tensors, float]:
    """``(alpha * other, 1)`` where ATen cannot take ``alpha`` as given, else unchanged."""
    if not isinstance(other, (list, tuple)):
        return (other if isinstance(alpha, (int, float)) and alpha == 1 else alpha * other), 1.0
    if isinstance(alpha, Tensor):
        return mul(list(other), alpha), 1.0
    return other, float(alpha)


def add(xs: Tensors, other: Scalar | Tensors, alpha: Scalar = 1) -> Tensors:
    """``[x + alpha * o for x, o in zip(xs, other)]``; ``other`` a list or a scalar."""
    other, alpha = _scaled(other, alpha)
    if not isinstance(other, (list, tuple)):
        if is_batched(xs, other):
            return [torch.add(x, other) for x in xs]
        return list(torch._foreach_add(xs, other))
    if is_batched(xs, other):
        return [torch.add(x, o, alpha=alpha) for x, o in zip(xs, other, strict=True)]
    return list(torch._foreach_add(xs, other, alpha=alpha))


def add_(xs: Tensors, other: Scalar | Tensors, alpha: Scalar = 1) -> Tensors:
    other, alpha = _scaled(other, alpha)
    if not isinstance(other, (list, tuple)):
        if is_batched(xs, other):
            for x in xs:
                x.add_(other)
        else:
            torch._foreach_add_(xs, other)
        return xs
    if is_batched(xs, other):
        for x, o in zip(xs, other, strict=True):
            x.add_(o, alpha=alpha)
    else:
        torch._foreach_add_(xs, other, alpha=alpha)
    return xs


def mul(xs: Tensors, other: Scalar | Tensors) -> Tensors:
    """``[x * o ...]``; ``other`` a list (elementwise) or a scalar."""
    if is_batched(xs, other):
        return [torch.mul(x, o) for x, o in zip(xs, _each(other, len(xs)), strict=True)]
    return list(torch._foreach_mul(xs, other))


def mul_(xs: Tensors, other: Scalar | Tensors) -> Tensors:
    if is_batched(xs, other):
        for x, o in zip(xs, _each(other, len(xs)), strict=True):
            x.mul_(o)
    else:
        torch._foreach_mul_(xs, other)
    return xs


def div(xs: Tensors, other: Scalar | Tensors) -> Tensors:
    """``[x / o ...]``; ``other`` a list (elementwise) or a scalar."""
    if is_batched(xs, other):
        return [torch.div(x, o) for x, o in zip(xs, _each(other, len(xs)), strict=True)]
    return list(torch._foreach_div(xs, other))


def div_(xs: Tensors, other: Scalar | Tensors) -> Tensors:
    if is_batched(xs, other):
        for x, o in zip(xs, _each(other, len(xs)), strict=True):
            x.div_(o)
    else:
        torch._foreach_div_(xs, other)
    return xs


def maximum(xs: Tensors, ys: Tensors) -> Tensors:
    """``[torch.maximum(x, y) ...]``."""
    if is_batched(xs, ys):
        return [torch.maximum(x, y) for x, y in zip(xs, ys, strict=True)]
    return list(torch._foreach_maximum(xs, ys))


def maximum_(xs: Tensors, ys: Tensors) -> Tensors:
    if is_batched(xs, ys):
        for x, y in zip(xs, ys, strict=True):
            x.copy_(torch.maximum(x, y))
    else:
        torch._foreach_maximum_(xs, ys)
    return xs


def clamp_min(xs: Tensors, low: float | Tensors) -> Tensors:
    """``[x.clamp(min=low) ...]``; ``low`` a number or a list of tensors (one per ``x``)."""
    if is_batched(xs, low):
        return [torch.clamp(x, min=lo) for x, lo in zip(xs, _each(low, len(xs)), strict=True)]
    return list(torch._foreach_clamp_min(xs, low))


def clamp_min_(xs: Tensors, low: float | Tensors) -> Tensors:
    if is_batched(xs, low):
        for x, lo in zip(xs, _each(low, len(xs)), strict=True):
            x.copy_(torch.clamp(x, min=lo))
    else:
        torch._foreach_clamp_min_(xs, low)
    return xs


def _like(weight: Scalar, x: Tensor) -> Scalar:
    # ATen's lerp wants a tensor weight in the tensors' dtype (bfloat16 groups use float32 scalars).
    return weight.to(x.dtype) if isinstance(weight, Tensor) else weight


def lerp(xs: Tensors, ys: Tensors, weight: Scalar) -> Tensors:
    """``[x + weight * (y - x) ...]`` with ATen's ``lerp`` rounding."""
    if isinstance(weight, Tensor) or is_batched(xs, ys):
        return [torch.lerp(x, y, _like(weight, x)) for x, y in zip(xs, ys, strict=True)]
    return list(torch._foreach_lerp(xs, ys, weight))


def lerp_(xs: Tensors, ys: Tensors, weight: Scalar) -> Tensors:
    if isinstance(weight, Tensor) or is_batched(xs, ys):
        for x, y in zip(xs, ys, strict=True):
            x.copy_(torch.lerp(x, y, _like(weight, x)))
    else:
        torch._foreach_lerp_(xs, ys, weight)
    return xs


# --------------------------------------------------------------------------- ternary


def addcmul(xs: Tensors, ys: Tensors, zs: Tensors, value: Scalar = 1) -> Tensors:
    """``[x + value * y * z ...]``."""
    if isinstance(value, Tensor):
        ys, value = mul(ys, value), 1
    if is_batched(xs, ys, zs):
        return [torch.addcmul(x, y, z, value=value) for x, y, z in zip(xs, ys, zs, strict=True)]
    return list(torch._foreach_addcmul(xs, ys, zs, value=value))


def addcmul_(xs: Tensors, ys: Tensors, zs: Tensors, value: Scalar = 1) -> Tensors:
    if isinstance(value, Tensor):
        ys, value = mul(ys, value), 1
    if is_batched(xs, ys, zs):
        for x, y, z in zip(xs, ys, zs, strict=True):
            x.copy_(torch.addcmul(x, y, z, value=value))
    else:
        torch._foreach_addcmul_(xs, ys, zs, value=value)
    return xs


def addcdiv(xs: Tensors, ys: Tensors, zs: Tensors, value: Scalar = 1) -> Tensors:
    """``[x + value * y / z ...]``."""
    if isinstance(value, Tensor):
        ys, value = mul(ys, value), 1
    if is_batched(xs, ys, zs):
        return [torch.addcdiv(x, y, z, value=value) for x, y, z in zip(xs, ys, zs, strict=True)]
    return list(torch._foreach_addcdiv(xs, ys, zs, value=value))


def addcdiv_(xs: Tensors, ys: Tensors, zs: Tensors, value: Scalar = 1) -> Tensors:
    if isinstance(value, Tensor):
        ys, value = mul(ys, value), 1
    if is_batched(xs, ys, zs):
        for x, y, z in zip(xs, ys, zs, strict=True):
            x.copy_(torch.addcdiv(x, y, z, value=value))
    else:
        torch._foreach_addcdiv_(xs, ys, zs, value=value)
    return xs


# --------------------------------------------------------------------------- writes


def copy_(xs: Tensors, ys: Tensors) -> Tensors:
    """``x.copy_(y)`` for each pair."""
    if is_batched(xs, ys):
        for x, y in zip(xs, ys, strict=True):
            x.copy_(y)
    else:
        torch._foreach_copy_(xs, ys)
    return xs


def where(cond: Tensor, xs: Tensors, ys: Tensors) -> Tensors:
    """``[where(cond, x, y) ...]`` in fresh tensors; ``cond`` a 0-d bool tensor."""
    return [torch.where(cond, x, y) for x, y in zip(xs, ys, strict=True)]


def where_(cond: Tensor, xs: Tensors, ys: Tensors) -> Tensors:
    """``y = where(cond, x, y)`` in place for each pair; ``cond`` a 0-d bool tensor.

    ``out=`` has no batching rule either, so under vmap the result is computed and copied.
    """
    if is_batched(xs, ys, cond):
        for x, y in zip(xs, ys, strict=True):
            y.copy_(torch.where(cond, x, y))
    else:
        for x, y in zip(xs, ys, strict=True):
            torch.where(cond, x, y, out=y)
    return ys
