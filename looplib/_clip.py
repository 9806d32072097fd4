"""``clip``: scale the gradient so that its global norm is at most ``max_norm``."""

from __future__ import annotations

import math

import torch

from . import _ops
from . import _validate as v
from ._step import ApplyFn, Micro, Stage
from ._transform import Transformer, stage_transformer
from ._tree import norms_of
from ._types import Params, Tensor, TrainState

EPS = 1e-6
"""Added to the norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` does."""


def clip_by_global_norm(
    grads: Params, max_norm: float, norm_type: float = 2.0
) -> tuple[Params, Tensor]:
    """Out-of-place ``clip_grad_norm_``: returns the scaled gradients and the total norm.

    ``coef = min(1, max_norm / (norm + 1e-6))`` multiplies every gradient, as a tensor (no host
    sync, no Python branch), so the result equals ``clip_grad_norm_`` bit for bit.

    >>> g, norm = clip_by_global_norm({"w": torch.tensor([3.0, 4.0])}, 1.0)
    >>> norm, g["w"]
    (tensor(5.), tensor([0.6000, 0.8000]))
    """
    max_norm = v.positive("clip_by_global_norm", "max_norm", max_norm, allow_inf=True)
    p = v.norm_type("clip_by_global_norm", "norm_type", norm_type)
    if not isinstance(grads, dict):
        v.fail("clip_by_global_norm", "grads", "must be a dict of tensors", grads, exc=TypeError)
    return _clip(grads, max_norm, p, None)


def _clip(
    grads: Params, max_norm: float, p: float, known: dict[float, tuple[list[Tensor], Tensor]] | None
) -> tuple[Params, Tensor]:
    _, total = known[p] if known and p in known else norms_of(grads, p)
    coef = torch.clamp(max_norm / (total + EPS), max=1.0)
    scaled = _ops.mul(list(grads.values()), coef) if grads else []
    return dict(zip(grads.keys(), scaled, strict=True)), total


def clip(max_norm: float, norm_type: float | str = 2.0) -> Transformer:
    """Clip the gradient by the global norm of all parameters together.

    The gradient ``g`` (all parameters as one vector) becomes ``g * min(1, max_norm / (|g|_p +
    1e-6))``, exactly as ``torch.nn.utils.clip_grad_norm_`` computes it, but out of place and
    with the coefficient kept as a tensor. ``clip(inf)`` is the identity (it does not turn an
    infinite gradient into NaN). Where it stands in a chain decides what it clips: after
    ``accumulate`` the accumulated gradient, before it each micro-batch's gradient.

    Args:
        max_norm: the largest norm allowed, positive (``inf`` disables clipping).
        norm_type: the order p of the norm, positive or ``inf``.

    Returns:
        a transformer: ``clip(1.0)(step)`` or ``chain(..., clip(1.0))``.

    Example:
        >>> import looplib as ll
        >>> ll.clip(0.5)
        clip(0.5)
    """
    max_norm = v.positive("clip", "max_norm", max_norm, allow_inf=True)
    p = v.norm_type("clip", "norm_type", norm_type)
    name = f"clip({max_norm!r})" if p == 2.0 else f"clip({max_norm!r}, norm_type={p!r})"

    def wrap(inner: ApplyFn) -> ApplyFn:
        if math.isinf(max_norm):
            return inner

        def apply(state: TrainState, micro: Micro) -> TrainState:
            clipped, _ = _clip(micro.grads, max_norm, p, micro.norms)
            return inner(state, micro._replace(grads=clipped, norms=None))

        return apply

    return stage_transformer(Stage(name, wrap))
