"""Argument checks shared by every public function.

Every message has one shape, pinned by tests::

    accumulate(k=0): k must be a positive int, got 0.

that is: the function and the argument as called, the rule, the value received, and, where one
helps, the fix.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, NoReturn

from ._types import TrainState, describe


def fail(
    func: str, arg: str, rule: str, value: Any, fix: str = "", exc: type[Exception] = ValueError
) -> NoReturn:
    """Raise ``exc`` with looplib's standard message."""
    shown = describe(value)
    message = f"{func}({arg}={shown}): {arg} {rule}, got {shown}."
    if fix:
        message += f" {fix}"
    raise exc(message)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(func: str, arg: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        fail(func, arg, "must be a positive int", value, exc=TypeError)
    if value < 1:
        fail(func, arg, "must be a positive int", value)
    return int(value)


def nonnegative_int(func: str, arg: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        fail(func, arg, "must be a non-negative int", value, exc=TypeError)
    if value < 0:
        fail(func, arg, "must be a non-negative int", value)
    return int(value)


def real(func: str, arg: str, value: Any, rule: str = "must be a real number") -> float:
    if not _is_real(value):
        fail(func, arg, rule, value, exc=TypeError)
    return float(value)


def finite(func: str, arg: str, value: Any) -> float:
    x = real(func, arg, value, "must be a finite real number")
    if not math.isfinite(x):
        fail(func, arg, "must be a finite real number", value)
    return x


def nonnegative(func: str, arg: str, value: Any, *, allow_inf: bool = False) -> float:
    rule = "must be a non-negative real number" + (" or inf" if allow_inf else "")
    x = real(func, arg, value, rule)
    if math.isnan(x) or x < 0 or (math.isinf(x) and not allow_inf):
        fail(func, arg, rule, value)
    return x


def positive(func: str, arg: str, value: Any, *, allow_inf: bool = False) -> float:
    rule = "must be a positive real number" + (" or inf" if allow_inf else "")
    x = real(func, arg, value, rule)
    if math.isnan(x) or x <= 0 or (math.isinf(x) and not allow_inf):
        fail(func, arg, rule, value)
    return x


def in_range(
    func: str, arg: str, value: Any, low: float, high: float, *, closed: str = "[]"
) -> float:
    """A real number in an interval; ``closed`` says which ends are included ("[]", "[)", "()")."""
    rule = f"must be a real number in {closed[0]}{low}, {high}{closed[1]}"
    x = real(func, arg, value, rule)
    lo_ok = x >= low if closed[0] == "[" else x > low
    hi_ok = x <= high if closed[1] == "]" else x < high
    if math.isnan(x) or not (lo_ok and hi_ok):
        fail(func, arg, rule, value)
    return x


def one_of(func: str, arg: str, value: Any, choices: Iterable[Any]) -> Any:
    options = list(choices)
    if value not in options:
        fail(func, arg, f"must be one of {options!r}", value)
    return value


def is_callable(func: str, arg: str, value: Any, what: str = "a callable") -> Any:
    if not callable(value):
        fail(func, arg, f"must be {what}", value, exc=TypeError)
    return value


def norm_type(func: str, arg: str, value: Any) -> float:
    """A p-norm order: a positive real number, ``inf`` or the string ``'inf'``."""
    if isinstance(value, str) and value.lower() == "inf":
        return math.inf
    rule = "must be a positive real number, inf or 'inf'"
    if not _is_real(value):
        fail(func, arg, rule, value, exc=TypeError)
    x = float(value)
    if math.isnan(x) or x <= 0:
        fail(func, arg, rule, value)
    return x


def add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` where it arose, keeping the error's type and message intact.

    Python 3.11+ shows notes under the message in the traceback (``exc.__notes__``). Older
    Pythons do not show notes, so there the note is also appended to the message; ``__notes__``
    holds it on every version.
    """
    if hasattr(exc, "add_note"):
        exc.add_note(note)
        return
    exc.__notes__ = [*getattr(exc, "__notes__", []), note]
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}\n{note}", *exc.args[1:])


def train_state(func: str, state: Any) -> TrainState:
    """``state``, checked to be a :class:`TrainState`."""
    if not isinstance(state, TrainState):
        fail(func, "state", "must be a looplib TrainState (from ll.init)", state, exc=TypeError)
    return state
