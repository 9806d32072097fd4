"""``track_norm``: record the gradient's p-norm, in total and per parameter."""

from __future__ import annotations

import torch

from . import _validate as v
from ._step import ApplyFn, Micro, Stage
from ._transform import Transformer, stage_transformer
from ._tree import norm_name, norms_of, promote_dtype
from ._types import Metrics, TrainState


def norm_keys(p: float, names: tuple[str, ...], per_param: bool = True) -> tuple[str, ...]:
    """The metric names ``track_norm(p)`` writes: per parameter, then the total."""
    tag = norm_name(p)
    keys = tuple(f"grad_{tag}_norm/{name}" for name in names) if per_param else ()
    return (*keys, f"grad_{tag}_norm_total")


def track_norm(norm_type: float | str = 2.0, *, per_param: bool = True) -> Transformer:
    """Record the gradient's norm into ``state.metrics``, where it stands in the chain.

    Writes ``grad_{p}_norm_total`` (the p-norm of all gradients together) and, with
    ``per_param``, ``grad_{p}_norm/{name}`` for each parameter, p printed as a float
    (``grad_2.0_norm_total``, ``grad_inf_norm_total``), as tensors. Before ``clip`` in a chain it
    sees the unclipped gradient (what classic trainers report); after ``accumulate`` it sees the
    accumulated gradient once per update, and the values stay in ``state.metrics`` until the next
    update (they are NaN before the first one).

    Args:
        norm_type: the order p, positive or ``inf``.
        per_param: also record one norm per parameter.

    Returns:
        a transformer.

    Example:
        >>> import looplib as ll
        >>> ll.track_norm("inf")
        track_norm(inf)
    """
    p = v.norm_type("track_norm", "norm_type", norm_type)
    if not isinstance(per_param, bool):
        v.fail("track_norm", "per_param", "must be a bool", per_param, exc=TypeError)
    name = f"track_norm({p!r}" + ("" if per_param else ", per_param=False") + ")"
    known: dict[tuple[str, ...], tuple[str, ...]] = {}  # names -> keys, built once per model

    def keys_for(names: tuple[str, ...]) -> tuple[str, ...]:
        if names not in known:
            known[names] = norm_keys(p, names, per_param)
        return known[names]

    def init(state: TrainState, loss: Metrics | None) -> TrainState:
        keys = keys_for(tuple(state.params))
        if all(k in state.metrics for k in keys):
            return state
        dtype = promote_dtype(state.params)
        device = state.step.device
        # One tensor per key: aliased leaves in a state would make a compiled step retrace.
        missing = {
            k: torch.full((), float("nan"), dtype=dtype, device=device)
            for k in keys
            if k not in state.metrics
        }
        return state._replace(metrics={**state.metrics, **missing})

    def wrap(inner: ApplyFn) -> ApplyFn:
        def apply(state: TrainState, micro: Micro) -> TrainState:
            memo = dict(micro.norms or {})
            each, total = norms_of(micro.grads, p, memo)
            keys = keys_for(tuple(micro.grads))
            values = [*each, total] if per_param else [total]
            metrics = {**state.metrics, **dict(zip(keys, values, strict=True))}
            return inner(state._replace(metrics=metrics), micro._replace(norms=memo))

        return apply

    return stage_transformer(Stage(name, wrap, init=init))
