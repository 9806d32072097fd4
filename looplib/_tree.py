"""The few tensor-pytree helpers the rest of looplib needs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import optree
import torch

from . import _ops
from ._types import Params, Tensor


def zeros_like(params: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in params.items()}


class StructureChange(ValueError):
    """A tree changed its structure, shape or dtype where it must not; the message is the path
    and the change (the step adds its own name)."""


def select(pred: Tensor, if_true: Any, if_false: Any) -> Any:
    """Leafwise ``torch.where(pred, a, b)`` over two trees of one structure: a branch without a
    host sync. Trees that differ in structure, shape or dtype are an error naming the path
    (``torch.where`` would promote or broadcast them silently)."""
    # torch's own pytree functions, which every compiler release can trace.
    flat_true, spec = torch.utils._pytree.tree_flatten(if_true)
    flat_false, other = torch.utils._pytree.tree_flatten(if_false)
    if spec != other or any(
        not isinstance(a, torch.Tensor)
        or not isinstance(b, torch.Tensor)
        or a.shape != b.shape
        or a.dtype != b.dtype
        for a, b in zip(flat_true, flat_false, strict=True)
    ):
        raise StructureChange(structure_difference(if_false, if_true, devices=False) or "")
    chosen = [torch.where(pred, a, b) for a, b in zip(flat_true, flat_false, strict=True)]
    return torch.utils._pytree.tree_unflatten(chosen, spec)


def detach(tree: Any) -> Any:
    """Detach every tensor leaf of ``tree`` (other leaves pass through)."""
    return optree.tree_map(
        lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree, none_is_leaf=True
    )


def total_norm(per_tensor: list[Tensor], p: float) -> Tensor:
    """The p-norm of all tensors together, given the norm of each, computed as
    ``torch.nn.utils.get_total_norm`` does (so the two agree bit for bit)."""
    if not per_tensor:
        return torch.zeros(())
    dtype = per_tensor[0].dtype
    for n in per_tensor[1:]:
        dtype = torch.promote_types(dtype, n.dtype)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in per_tensor]), p)


def norm_name(p: float) -> str:
    """``2.0`` for p = 2, ``inf`` for the infinity norm (the classic trainers' key format)."""
    return "inf" if math.isinf(p) else str(float(p))


def norms_of(
    grads: Params, p: float, memo: dict[float, tuple[list[Tensor], Tensor]] | None = None
) -> tuple[list[Tensor], Tensor]:
    """The p-norm of each gradient and of all together. ``memo`` holds norms already computed
    for exactly these gradients (``Micro.norms``), so ``track_norm`` and ``clip`` side by side
    compute them once; a new result is added to it."""
    if memo is not None and p in memo:
        return memo[p]
    each = _ops.norm(list(grads.values()), p) if grads else []
    result = (each, total_norm(each, p))
    if memo is not None:
        memo[p] = result
    return result


def promote_dtype(params: Params) -> torch.dtype:
    dtype = torch.float32
    for i, v in enumerate(params.values()):
        dtype = v.dtype if i == 0 else torch.promote_types(dtype, v.dtype)
    return dtype


# ---------------------------------------------------------------------------------------------
# Paths and structure checks: a step returns exactly the structure it received.


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}[{key!r}]"


def _walk(tree: Any, prefix: str, out: dict[str, Any]) -> None:
    """Flatten ``tree`` into ``{readable path: leaf}``, naming NamedTuple fields."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        for name, value in zip(tree._fields, tree, strict=True):
            _walk(value, f"{prefix}.{name}", out)
    elif isinstance(tree, Mapping):
        for key in tree:
            _walk(tree[key], _join(prefix, key), out)
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            _walk(value, _join(prefix, i), out)
    else:
        out[prefix] = tree


def leaves_by_path(tree: Any, root: str = "state") -> dict[str, Any]:
    out: dict[str, Any] = {}
    _walk(tree, root, out)
    return out


def _kind(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    return type(x).__name__


def structure_difference(
    before: Any, after: Any, root: str = "state", *, devices: bool = True
) -> str | None:
    """Describe the first place where ``after`` differs from ``before`` in structure, shape or
    dtype (and device, with ``devices``), or return ``None`` when they agree."""
    a = leaves_by_path(before, root)
    b = leaves_by_path(after, root)
    for path in a:
        if path not in b:
            return f"{path} is missing from the output (it was {_kind(a[path])})"
    for path in b:
        if path not in a:
            return f"{path} appeared in the output ({_kind(b[path])}) but was not in the input"
    for path, x in a.items():
        y = b[path]
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return f"{path} changed from {_kind(x)} to {_kind(y)}"
        if isinstance(x, torch.Tensor) and (x.shape != y.shape or x.dtype != y.dtype):
            return f"{path} changed from {_kind(x)} to {_kind(y)}"
        if devices and isinstance(x, torch.Tensor) and x.device != y.device:
            return f"{path} moved from {x.device} to {y.device}"
    if optree.tree_structure(before, none_is_leaf=True) != optree.tree_structure(
        after, none_is_leaf=True
    ):
        return f"{root} changed its container types: {optree.tree_structure(before)} -> {optree.tree_structure(after)}"
    return None


def shapes_only(tree: Any) -> Any:
    """The tree with every tensor replaced by an empty one of its shape and dtype on the
    ``meta`` device: a record of the structure that holds no data."""
    return optree.tree_map(
        lambda x: (
            torch.empty(x.shape, dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else x
        ),
        tree,
        none_is_leaf=True,
    )
