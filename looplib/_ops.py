"""Operations over lists of tensors that also run under ``torch.func.vmap``.

``torch._foreach_*`` kernels are the fast way to touch every gradient at once, but they have no
batching rule: under ``vmap`` (an ensemble trained as one, see :func:`looplib.vmap`) they raise.
Each function here is the foreach kernel, or the same operation tensor by tensor when the
tensors are batched; the two give the same values. This is the one place that tells them apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._C._functorch import is_batchedtensor

from ._types import Tensor

Tensors = Sequence[Tensor]


def batched(xs: Tensors) -> bool:
    """Whether the tensors are functorch-batched (inside ``torch.func.vmap``)."""
    return bool(xs) and is_batchedtensor(xs[0])


def add(xs: Tensors, ys: Tensors) -> list[Tensor]:
    if batched(xs) or batched(ys):
        return [x + y for x, y in zip(xs, ys, strict=True)]
    return list(torch._foreach_add(xs, ys))


def add_scaled(xs: Tensors, ys: Tensors, scale: Tensor) -> list[Tensor]:
    """``x + y * scale`` for each pair."""
    if batched(xs) or batched(ys) or is_batchedtensor(scale):
        return [x + y * scale for x, y in zip(xs, ys, strict=True)]
    return list(torch._foreach_add(xs, torch._foreach_mul(ys, scale)))


def mul(xs: Tensors, scale: Tensor | float) -> list[Tensor]:
    if batched(xs) or (isinstance(scale, Tensor) and is_batchedtensor(scale)):
        return [x * scale for x in xs]
    return list(torch._foreach_mul(xs, scale))


def div(xs: Tensors, scale: Tensor | float) -> list[Tensor]:
    if batched(xs) or (isinstance(scale, Tensor) and is_batchedtensor(scale)):
        return [x / scale for x in xs]
    return list(torch._foreach_div(xs, scale))


def norms(xs: Tensors, p: float) -> list[Tensor]:
    """The p-norm of each tensor (0-d tensors)."""
    if batched(xs):
        return [torch.linalg.vector_norm(x, p) for x in xs]
    return list(torch._foreach_norm(xs, p))


def where(pred: Tensor, xs: Tensors, ys: Tensors) -> list[Tensor]:
    return [torch.where(pred, x, y) for x, y in zip(xs, ys, strict=True)]
