"""The shared frame of every optimizer: state, parameter groups, schedules, update and update_.

An optimizer here is a *kernel*, a function that updates one group of parameters (one device,
one dtype, one weight-decay flag) given lists of tensors, plus a description of its state. The
frame (:func:`build`) turns it into an :class:`~looplib._types.Optimizer`:

* ``init(params)`` builds ``state_cls(count=0, <scalar fields>, <buffer fields>)``; each buffer
  field is a dict keyed like ``params`` (a parameter may have no entry, e.g. Adafactor's
  factored moments exist only for matrices);
* every update evaluates each hyperparameter at ``count`` (a schedule is a callable of the 0-d
  int64 count, 0 for the first update: ``LambdaLR``'s convention), groups the parameters by
  (device, dtype, decayed or not, optional kernel key) in ``params`` order as torch.optim groups
  them, and runs the kernel once per group;
* ``update`` allocates its outputs and never writes into its inputs; ``update_`` runs the very
  same kernel with ``inplace=True``, writing into the donated ``params`` and ``opt_state``, so the
  two agree to the last bit;
* ``hyperparams(state)`` is ``{"lr": lr(max(count - 1, 0))}``, a 0-d tensor computed from the
  state alone: the learning rate of the last update (before the first: of the first). A number
  ``lr`` is reported as a float32 tensor on the count's device; a schedule's own tensor as it is.

Per-step scalars (bias corrections, step sizes) are 0-d tensors in the group's *scalar dtype*:
the parameters' dtype for float32 and float64, float32 otherwise. A hyperparameter given as a
number stays a Python number, so the kernels pass it to ATen exactly as torch.optim does.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple, TypeAlias

import torch

from .. import _ops as ops
from .._types import Optimizer, Params, Tensor
from . import _checks
from ._checks import Hyper
from ._masks import Resolver

Tensors: TypeAlias = "list[Tensor]"
Scalar: TypeAlias = "float | Tensor"


class Ctx(NamedTuple):
    """What a kernel knows about its group besides the tensors and hyperparameters.

    Attributes:
        count: updates applied before this one, a 0-d int64 tensor on the group's device.
        step: ``count + 1`` in ``dtype`` (torch.optim's ``step`` after its increment).
        dtype: the scalar dtype of the group (see the module docstring).
        param_dtype: the parameters' dtype.
        inplace: whether the kernel may write into the parameter and buffer lists it is given.
        scalars: the new values of the state's scalar fields, on the group's device.
    """

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count, as in the states
    step: Tensor
    dtype: torch.dtype
    param_dtype: torch.dtype
    inplace: bool
    scalars: dict[str, Tensor]


Kernel: TypeAlias = Callable[
    [Tensors, Tensors, dict[str, Tensors], dict[str, Scalar], Ctx],
    tuple[Tensors, dict[str, Tensors]],
]
BufferInit: TypeAlias = Callable[[Tensor], "Tensor | None"]
ScalarField: TypeAlias = tuple[
    Callable[[torch.device], Tensor], Callable[[Tensor, dict[str, Scalar], Tensor], Tensor]
]


def scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for per-step scalars (bias corrections, step sizes) of a parameter group."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def at(h: Hyper, count: Tensor) -> Scalar:
    """A hyperparameter's value at ``count``: the number itself, or the schedule's value."""
    if not callable(h):
        return h
    x = h(count)
    if isinstance(x, Tensor):
        if x.dim() != 0:
            raise ValueError(
                f"A schedule must return a number or a 0-d tensor, got a tensor of shape "
                f"{tuple(x.shape)} from {h!r}."
            )
        return x
    return float(x)


def on(x: Scalar, device: torch.device, dtype: torch.dtype) -> Scalar:
    return x.to(device=device, dtype=dtype) if isinstance(x, Tensor) else x


def metric(x: Scalar, count: Tensor) -> Tensor:
    """A hyperparameter value as a 0-d tensor for ``hyperparams``."""
    if isinstance(x, Tensor):
        return x
    return torch.full((), x, dtype=torch.float32, device=count.device)  # a fill, no copy


def lr_report(lr: Hyper) -> Callable[[Any], dict[str, Tensor]]:
    """``hyperparams``: the learning rate of the last update, from ``state.count`` alone."""

    def hyperparams(state: Any) -> dict[str, Tensor]:
        last = torch.clamp(state.count - 1, min=0)
        return {"lr": metric(at(lr, last), state.count)}

    return hyperparams


def init_count(params: Params) -> Tensor:
    device = next(iter(params.values())).device if params else torch.device("cpu")
    return torch.zeros((), dtype=torch.int64, device=device)


def groups(
    params: Params,
    decayed: Mapping[str, bool] | None,
    key: Callable[[Tensor], Hashable] | None,
) -> dict[tuple[Any, ...], list[str]]:
    """Parameter names grouped by (device, dtype, decayed, key(p)), each group in params order."""
    out: dict[tuple[Any, ...], list[str]] = {}
    for name, p in params.items():
        g = (
            p.device,
            p.dtype,
            True if decayed is None else decayed[name],
            None if key is None else key(p),
        )
        out.setdefault(g, []).append(name)
    return out


def write(inplace: bool, op_: Callable[..., Tensors], op: Callable[..., Tensors]) -> Any:
    """``op_`` (writes into its first list) when ``inplace``, else ``op`` (allocates)."""
    return op_ if inplace else op


def build(
    name: str,
    state_cls: type,
    kernel: Kernel,
    *,
    hyper: dict[str, Hyper],
    buffers: dict[str, BufferInit],
    scalars: dict[str, ScalarField] | None = None,
    decay: str | None = None,
    mask: Any = None,
    key: Callable[[Tensor], Hashable] | None = None,
) -> Optimizer:
    """An :class:`Optimizer` from a per-group ``kernel`` (see the module docstring).

    Args:
        name: the factory's name, for error messages.
        state_cls: a NamedTuple with the fields ``count``, then ``scalars``, then ``buffers``.
        kernel: ``kernel(ps, gs, bufs, h, ctx) -> (ps, bufs)``: updates one group; ``bufs`` maps
            each buffer field to the group's list (empty where the group has none); ``h`` maps
            each hyperparameter to its value now (the ``decay`` one is ``0.0`` for a group the
            mask excludes). With ``ctx.inplace`` it must write into ``ps`` and ``bufs``;
            without, it must not write into them, nor ever into ``gs``.
        hyper: the hyperparameters, numbers or schedules, by name; ``"lr"`` is reported.
        buffers: per buffer field, ``init(p) -> tensor`` (or ``None``: no entry for ``p``).
        scalars: per scalar field (one 0-d tensor for the whole state), ``(init(device),
            advance(old, h, count) -> new)``; the kernels see the new values in ``ctx.scalars``.
        decay: the name of the hyperparameter the ``mask`` applies to (weight decay).
        mask: which parameters are decayed (see :mod:`._masks`); ``None`` decays all.
        key: an extra grouping key per parameter (Adafactor: factored or not).
    """
    scalar_fields = scalars or {}
    resolver: Resolver[bool] | None = None if mask is None else Resolver(name, "mask", mask, "mask")

    def init(params: Params) -> Any:
        count = init_count(params)
        fields: dict[str, Any] = {f: make(count.device) for f, (make, _) in scalar_fields.items()}
        for f, fn in buffers.items():
            fields[f] = {k: b for k, p in params.items() if (b := fn(p)) is not None}
        if resolver is not None:
            resolver(params)  # fail early, and fill the cache outside any compiled region
        return state_cls(count=count, **fields)

    def apply(
        grads: Params, state: Any, params: Params, inplace: bool
    ) -> tuple[Params, dict[str, dict[str, Tensor]], dict[str, Tensor]]:
        _checks.keys(name, grads, params)
        decayed = None if resolver is None else resolver(params)
        count = state.count
        h = {k: at(v, count) for k, v in hyper.items()}
        new_scalars = {f: adv(getattr(state, f), h, count) for f, (_, adv) in scalar_fields.items()}
        new_params: Params = {}
        new_bufs: dict[str, dict[str, Tensor]] = {f: {} for f in buffers}
        for (device, dtype, decays, _), keys in groups(params, decayed, key).items():
            sdtype = scalar_dtype(dtype)
            hg = {k: on(v, device, sdtype) for k, v in h.items()}
            if decay is not None and not decays:
                hg[decay] = 0.0
            ctx = Ctx(
                count=count.to(device),
                step=(count + 1).to(device=device, dtype=sdtype),
                dtype=sdtype,
                param_dtype=dtype,
                inplace=inplace,
                scalars={f: v.to(device) for f, v in new_scalars.items()},
            )
            held = {f: [k for k in keys if k in getattr(state, f)] for f in buffers}
            ps, bs = kernel(
                [params[k] for k in keys],
                [grads[k] for k in keys],
                {f: [getattr(state, f)[k] for k in held[f]] for f in buffers},
                hg,
                ctx,
            )
            new_params.update(zip(keys, ps, strict=True))
            for f in buffers:
                new_bufs[f].update(zip(held[f], bs[f], strict=True))
        return new_params, new_bufs, new_scalars

    def update(grads: Params, opt_state: Any, params: Params) -> tuple[Params, Any]:
        new_params, new_bufs, new_scalars = apply(grads, opt_state, params, inplace=False)
        fields: dict[str, Any] = dict(new_scalars)
        for f, values in new_bufs.items():
            fields[f] = {k: values[k] for k in params if k in values}
        state = state_cls(count=opt_state.count + 1, **fields)
        return {k: new_params[k] for k in params}, state

    def update_(grads: Params, opt_state: Any, params: Params) -> tuple[Params, Any]:
        _, _, new_scalars = apply(grads, opt_state, params, inplace=True)
        for f, v in new_scalars.items():
            getattr(opt_state, f).copy_(v)
        opt_state.count.add_(1)
        return params, opt_state

    return Optimizer(init, update, update_, lr_report(hyper["lr"]))


def add_scaled(ps: Tensors, us: Tensors, scale: Scalar, inplace: bool) -> Tensors:
    """``[p + scale * u ...]``: into ``ps`` when ``inplace``, else into fresh tensors, to the same
    bits (addition commutes exactly, so ``u * s + p`` is ``p + u * s``). A tensor ``scale`` costs
    one temporary per parameter."""
    if isinstance(scale, Tensor):
        delta = ops.mul(us, scale)
        return ops.add_(ps, delta) if inplace else ops.add_(delta, ps)
    return ops.add_(ps, us, alpha=scale) if inplace else ops.add(ps, us, alpha=scale)


def add_delta(ps: Tensors, delta: Tensors, inplace: bool) -> Tensors:
    """``[p + d ...]``: into ``ps`` when ``inplace``, else into ``delta`` (a temporary)."""
    return ops.add_(ps, delta) if inplace else ops.add_(delta, ps)


def is_off(x: Scalar) -> bool:
    """A term whose coefficient is the number 0 is skipped, as torch.optim skips it."""
    return not isinstance(x, Tensor) and x == 0


def pow(base: Scalar, exponent: Scalar) -> Tensor:
    """``base ** exponent`` rounded as Python's float ``**`` (libm's ``pow``), which is what
    torch.optim computes its step scalars with. ATen special-cases some number exponents (0.5 as
    ``sqrt``, -0.5 as ``rsqrt``), which round differently; with a tensor exponent it does not."""
    if not isinstance(exponent, Tensor):
        assert isinstance(base, Tensor)
        exponent = torch.full((), exponent, dtype=base.dtype, device=base.device)
    return torch.pow(base, exponent)
