"""Argument checks shared by the optimizer factories (messages in looplib's one shape)."""

from __future__ import annotations

import functools
import inspect
import math
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeAlias, TypeVar

import torch

from .. import _validate
from .._types import Tensor

Schedule: TypeAlias = Callable[[Tensor], "float | Tensor"]
Hyper: TypeAlias = "float | Schedule"
"""A hyperparameter: a number, or a schedule ``count -> value`` (``count`` a 0-d int64 tensor)."""

LR_RULE = "must be a non-negative finite real number or a schedule (a callable of the update count)"
BETAS_RULE = "must be a pair of real numbers (beta1, beta2), each in [0, 1)"
PARAMS_RULE = (
    "must be a hyperparameter, not the parameters to optimize: looplib optimizers take "
    "hyperparameters only; the state's params are passed at ll.init"
)
KEYS_FIX = (
    "Pass one gradient per parameter, under the same keys as params "
    "(zeros for a parameter the loss does not use)."
)

F = TypeVar("F", bound=Callable[..., Any])


def _looks_like_params(value: Any) -> bool:
    if isinstance(value, torch.nn.Module):
        return True
    if isinstance(value, Tensor):
        return value.dim() > 0
    if isinstance(value, (types.GeneratorType, Iterator)):
        return True
    if isinstance(value, Mapping):
        return True
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, (Tensor, Mapping)) for v in value)
    return False


def hyperparameters_only(factory: F) -> F:
    """Wrap an optimizer factory so that the torch habit ``adam(model.parameters(), lr=1e-3)``
    gets a clear error instead of Python's ``got multiple values for argument 'lr'``."""
    name = factory.__name__
    first = next(iter(inspect.signature(factory).parameters))

    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if args and _looks_like_params(args[0]):
            _validate.fail(
                name,
                first,
                PARAMS_RULE,
                args[0],
                f"Write opt = ll.optim.{name}(...hyperparameters...) and "
                "state = ll.init(model, opt).",
                exc=TypeError,
            )
        return factory(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def lr(func: str, value: Any) -> Hyper:
    if callable(value):
        return value
    x = _validate.real(func, "lr", value, LR_RULE)
    if not (math.isfinite(x) and x >= 0):
        _validate.fail(func, "lr", LR_RULE, value)
    return x


def hyper(func: str, arg: str, value: Any, check: Callable[[str, str, Any], float]) -> Hyper:
    """A schedule as given, or a number checked by ``check(func, arg, value)``."""
    if callable(value):
        return value
    return check(func, arg, value)


def unit(func: str, arg: str, value: Any) -> float:
    """A real number in [0, 1)."""
    return _validate.in_range(func, arg, value, 0.0, 1.0, closed="[)")


def betas(func: str, value: Any) -> tuple[Hyper, Hyper]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        _validate.fail(func, "betas", BETAS_RULE, value, exc=TypeError)
    out: list[Hyper] = []
    for i, b in enumerate(value):
        if callable(b):
            out.append(b)
            continue
        if not _validate._is_real(b):
            _validate.fail(
                func, "betas", BETAS_RULE, value, f"betas[{i}] is not a real number.", TypeError
            )
        if not 0.0 <= float(b) < 1.0:
            _validate.fail(func, "betas", BETAS_RULE, value, f"betas[{i}]={b!r} is out of range.")
        out.append(float(b))
    return out[0], out[1]


def boolean(func: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _validate.fail(func, arg, "must be a bool", value, exc=TypeError)
    return value


def nonzero(value: Hyper) -> bool:
    """Whether a term with this coefficient runs at all: a schedule always does; a number unless
    it is 0 (torch.optim skips such terms, e.g. ``if weight_decay != 0``)."""
    return callable(value) or value != 0


def keys(func: str, grads: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    # Compares dict keys only (no tensor is read), so torch.compile keeps it as a guard.
    if grads.keys() != params.keys():
        missing = [k for k in params if k not in grads]
        extra = [k for k in grads if k not in params]
        _validate.fail(
            f"{func}.update",
            "grads",
            "must have the same keys as params",
            list(grads),
            f"Missing: {missing}; unexpected: {extra}. {KEYS_FIX}",
        )
