"""``clip_value``: clamp every gradient element to ``[-clip_value, clip_value]``."""

from __future__ import annotations

import math

import torch

from . import _validate as v
from ._step import ApplyFn, Micro, Stage
from ._transform import Transformer, stage_transformer
from ._types import Params, TrainState


def _clamp(grads: Params, c: float) -> Params:
    # One clamp per tensor (a list op has no two-sided clamp); NaN stays NaN, as in torch.
    return {k: torch.clamp(g, min=-c, max=c) for k, g in grads.items()}


def clip_value(clip_value: float) -> Transformer:
    """Clamp every element of the gradient to ``[-clip_value, clip_value]``.

    The out-of-place ``torch.nn.utils.clip_grad_value_``, bit for bit::

        grads = {name: g.clamp(-clip_value, clip_value) for name, g in grads.items()}

    A NaN element stays NaN; ``inf`` becomes ``clip_value``. ``clip_value(inf)`` is the identity.
    Where it stands in a chain decides what it clamps, as for :func:`clip`: before
    ``accumulate`` each micro-batch's gradient, after it the window's (mean) gradient once per
    update.

    Args:
        clip_value: the largest absolute value allowed, positive (``inf`` disables clamping).

    Returns:
        a transformer: ``clip_value(0.5)(step)`` or ``chain(..., clip_value(0.5))``.

    Example:
        >>> import looplib as ll
        >>> ll.clip_value(0.5)
        clip_value(0.5)
    """
    c = v.positive("clip_value", "clip_value", clip_value, allow_inf=True)
    name = f"clip_value({c!r})"

    def wrap(inner: ApplyFn) -> ApplyFn:
        if math.isinf(c):
            return inner

        def apply(state: TrainState, micro: Micro) -> TrainState:
            return inner(state, micro._replace(grads=_clamp(micro.grads, c), norms=None))

        return apply

    return stage_transformer(Stage(name, wrap))
