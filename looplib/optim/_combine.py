"""Optimizers over parts of the parameters: :func:`masked` and :func:`partition`."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

from .. import _validate
from .._checkpoint import register_checkpoint_type
from .._types import Optimizer, Params, Tensor
from ._masks import Labels, Mask, Resolver


class MaskedState(NamedTuple):
    """The state of :func:`masked`: the inner optimizer's state over the masked parameters."""

    inner: Any


register_checkpoint_type(MaskedState, name="looplib.optim.MaskedState")


def _check_optimizer(func: str, arg: str, opt: Any) -> Optimizer:
    if not isinstance(opt, Optimizer):
        _validate.fail(
            func, arg, "must be a looplib optimizer such as ll.optim.adam(1e-3)", opt, exc=TypeError
        )
    return opt


def masked(opt: Optimizer, mask: Mask) -> Optimizer:
    """Update only the parameters where ``mask`` is true; the others pass through untouched.

    ``opt`` sees only the masked parameters (and keeps state for them alone); the others are
    returned as the very tensors given, with no optimizer state. ``masked(opt, m)`` is
    optax's ``masked``, and freezing with torch.optim (leaving parameters out of it).

    Args:
        opt: the optimizer for the masked parameters.
        mask: a dict ``{name: bool}`` naming every parameter, or a callable
            ``(name, param) -> bool``; resolved once per set of parameter names.

    Returns:
        An ``Optimizer`` whose state is a :class:`MaskedState`; ``update_`` exists if ``opt``
        has one; ``hyperparams`` are ``opt``'s.

    Example:
        >>> import torch
        >>> from looplib.optim import sgd
        >>> opt = masked(sgd(0.5), lambda name, p: name != "frozen")
        >>> params = {"w": torch.tensor([1.0]), "frozen": torch.tensor([1.0])}
        >>> grads = {"w": torch.tensor([1.0]), "frozen": torch.tensor([1.0])}
        >>> new, state = opt.update(grads, opt.init(params), params)
        >>> new
        {'w': tensor([0.5000]), 'frozen': tensor([1.])}
    """
    func = "masked"
    inner = _check_optimizer(func, "opt", opt)
    resolver: Resolver[bool] = Resolver(func, "mask", mask, "mask")

    def sub(tree: Params, where: Mapping[str, bool]) -> Params:
        return {k: v for k, v in tree.items() if where[k]}

    def init(params: Params) -> MaskedState:
        return MaskedState(inner.init(sub(params, resolver(params))))

    def update(grads: Params, opt_state: MaskedState, params: Params) -> tuple[Params, Any]:
        where = resolver(params)
        new, state = inner.update(sub(grads, where), opt_state.inner, sub(params, where))
        return {k: new[k] if where[k] else p for k, p in params.items()}, MaskedState(state)

    def update_(grads: Params, opt_state: MaskedState, params: Params) -> tuple[Params, Any]:
        assert inner.update_ is not None
        where = resolver(params)
        inner.update_(sub(grads, where), opt_state.inner, sub(params, where))
        return params, opt_state

    def hyperparams(opt_state: MaskedState) -> dict[str, Tensor]:
        assert inner.hyperparams is not None
        return inner.hyperparams(opt_state.inner)

    return Optimizer(
        init,
        update,
        update_ if inner.update_ is not None else None,
        hyperparams if inner.hyperparams is not None else None,
    )


def partition(optimizers: Mapping[str, Optimizer], labels: Labels) -> Optimizer:
    """A different optimizer for each group of parameters, like torch.optim's parameter groups.

    Each parameter gets a label from ``labels``; the optimizer under that label updates it, and
    keeps its state. The state is a dict ``{label: inner_state}`` (in the order of
    ``optimizers``); an optimizer whose label no parameter has gets an empty state.

    nanoGPT's two groups (decay matrices and embeddings, not biases and norms)::

        opt = ll.optim.partition(
            {"decay": ll.optim.adamw(6e-4, weight_decay=0.1),
             "no_decay": ll.optim.adamw(6e-4, weight_decay=0.0)},
            lambda name, p: "decay" if p.dim() >= 2 else "no_decay",
        )

    (``adamw(6e-4, weight_decay=0.1, mask=lambda name, p: p.dim() >= 2)`` is the same update
    with one state.)

    Args:
        optimizers: ``{label: optimizer}``.
        labels: a dict ``{name: label}`` naming every parameter, or a callable
            ``(name, param) -> label``; resolved once per set of parameter names.

    Returns:
        An ``Optimizer``; ``update_`` exists if every inner optimizer has one; ``hyperparams``
        gives each inner optimizer's, keyed ``"<key>/<label>"`` (e.g. ``"lr/decay"``).

    Example:
        >>> import torch
        >>> from looplib.optim import sgd
        >>> opt = partition({"fast": sgd(1.0), "slow": sgd(0.1)}, {"a": "fast", "b": "slow"})
        >>> params = {"a": torch.tensor([1.0]), "b": torch.tensor([1.0])}
        >>> grads = {"a": torch.tensor([1.0]), "b": torch.tensor([1.0])}
        >>> new, state = opt.update(grads, opt.init(params), params)
        >>> new
        {'a': tensor([0.]), 'b': tensor([0.9000])}
        >>> sorted(opt.hyperparams(state))
        ['lr/fast', 'lr/slow']
    """
    func = "partition"
    if not isinstance(optimizers, Mapping) or not optimizers:
        _validate.fail(
            func,
            "optimizers",
            "must be a non-empty dict {label: optimizer}",
            optimizers,
            exc=TypeError,
        )
    for label in optimizers:
        if not isinstance(label, str):
            _validate.fail(
                func,
                "optimizers",
                "must have str labels (they key the state, which checkpoints store)",
                optimizers,
                f"Label {label!r} is a {type(label).__name__}.",
                exc=TypeError,
            )
    inner = {
        label: _check_optimizer(func, f"optimizers[{label!r}]", o)
        for label, o in optimizers.items()
    }
    resolver: Resolver[Hashable] = Resolver(func, "labels", labels, "labels", list(inner))

    def sub(tree: Params, where: Mapping[str, Hashable], label: Hashable) -> Params:
        return {k: v for k, v in tree.items() if where[k] == label}

    def init(params: Params) -> dict[Hashable, Any]:
        where = resolver(params)
        return {label: o.init(sub(params, where, label)) for label, o in inner.items()}

    def update(grads: Params, opt_state: Any, params: Params) -> tuple[Params, Any]:
        where = resolver(params)
        new: Params = {}
        state: dict[Hashable, Any] = {}
        for label, o in inner.items():
            p, state[label] = o.update(
                sub(grads, where, label), opt_state[label], sub(params, where, label)
            )
            new.update(p)
        return {k: new[k] for k in params}, state

    def update_(grads: Params, opt_state: Any, params: Params) -> tuple[Params, Any]:
        where = resolver(params)
        for label, o in inner.items():
            assert o.update_ is not None
            o.update_(sub(grads, where, label), opt_state[label], sub(params, where, label))
        return params, opt_state

    def hyperparams(opt_state: Any) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for label, o in inner.items():
            if o.hyperparams is not None:
                for key, value in o.hyperparams(opt_state[label]).items():
                    out[f"{key}/{label}"] = value
        return out

    every_update_ = all(o.update_ is not None for o in inner.values())
    return Optimizer(init, update, update_ if every_update_ else None, hyperparams)
