"""Masks and labels over parameter names: checked at construction, resolved once per name set.

A *mask* says, for each parameter, whether something applies to it (weight decay, an update): a
dict ``{name: bool}`` naming every parameter, or a callable ``(name, param) -> bool``. *Labels*
say which group each parameter belongs to: a dict ``{name: label}`` naming every parameter, or a
callable ``(name, param) -> label``. A dict must name every parameter and nothing else (the
callable is the convenient form for a rule), so a typo or a renamed module raises instead of
silently changing who gets decayed.

Resolution runs once per set of parameter names and is cached; the update reads the cache (a
dict lookup by the tuple of names). Tied parameters appear once in ``state.params`` (as
``named_parameters()`` lists them), so they are masked and labelled once, under their first name.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Generic, TypeAlias, TypeVar

from .. import _validate
from .._types import Params, Tensor

Mask: TypeAlias = "Mapping[str, bool] | Callable[[str, Tensor], bool]"
Labels: TypeAlias = "Mapping[str, Hashable] | Callable[[str, Tensor], Hashable]"

V = TypeVar("V")

_SPEC_RULE = {
    "mask": "must be a dict {name: bool} or a callable (name, param) -> bool",
    "labels": "must be a dict {name: label} or a callable (name, param) -> label",
}


class Resolver(Generic[V]):
    """``resolver(params) -> {name: value}`` for a mask (values bool) or labels (values in
    ``choices``), checked and cached per tuple of parameter names."""

    def __init__(
        self, func: str, arg: str, spec: Any, kind: str, choices: Sequence[Hashable] = ()
    ) -> None:
        self.func, self.arg, self.spec, self.kind = func, arg, spec, kind
        self.choices = list(choices)
        self.cache: dict[tuple[str, ...], dict[str, V]] = {}
        if isinstance(spec, Mapping):
            for name, value in spec.items():
                if not isinstance(name, str):
                    self._fail(f"must have str keys (parameter names); key {name!r} is not")
                self._check_value(value, name, returned=False)
        elif not callable(spec):
            _validate.fail(func, arg, _SPEC_RULE[kind], spec, exc=TypeError)

    def _fail(self, rule: str, fix: str = "", exc: type[Exception] = ValueError) -> None:
        _validate.fail(self.func, self.arg, rule, self.spec, fix, exc=exc)

    def _check_value(self, value: Any, name: str, returned: bool) -> None:
        got = (
            f"It returned {value!r} ({type(value).__name__}) for {name!r}"
            if returned
            else f"The value for {name!r} is {value!r} ({type(value).__name__})"
        )
        if self.kind == "mask":
            if not isinstance(value, bool):
                self._fail(
                    "must give a bool for every parameter", f"{got}; use True or False.", TypeError
                )
        elif not isinstance(value, Hashable) or value not in self.choices:
            self._fail(
                "must give every parameter a label that has an optimizer",
                f"{got}, which has no optimizer; labels with one: {self.choices!r}. "
                "Add an optimizer for it, or fix the label.",
            )

    def __call__(self, params: Params) -> dict[str, V]:
        names = tuple(params)
        hit = self.cache.get(names)
        if hit is None:
            hit = self.cache[names] = self._resolve(params)
        return hit

    def _resolve(self, params: Params) -> dict[str, V]:
        spec = self.spec
        if isinstance(spec, Mapping):
            unknown = [k for k in spec if k not in params]
            if unknown:
                self._fail(
                    "must name only parameters",
                    f"{unknown[0]!r} matches no parameter; parameters: {list(params)!r}.",
                )
            missing = [k for k in params if k not in spec]
            if missing:
                self._fail(
                    "must name every parameter (a dict is explicit; pass a callable "
                    "(name, param) -> value for a rule)",
                    f"Missing: {missing!r}.",
                )
            return {k: spec[k] for k in params}
        out: dict[str, V] = {}
        for name, p in params.items():
            value = spec(name, p)
            self._check_value(value, name, returned=True)
            out[name] = value
        return out


def split(params: Params, where: Mapping[str, bool]) -> tuple[Params, Params]:
    """``(selected, others)``: the parameters where ``where`` is true, and the rest."""
    yes = {k: p for k, p in params.items() if where[k]}
    no = {k: p for k, p in params.items() if not where[k]}
    return yes, no
