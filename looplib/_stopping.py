"""When to stop training: predicates over the metric history, and their combinators.

A *predicate* is any function ``history -> bool``. ``history`` is a sequence of per-epoch dicts
of floats, oldest first, e.g. ``[{"epoch": 0, "loss": 0.9, "val_loss": 0.8}, ...]``. A
predicate keeps no state: every call recomputes its decision from the history it is given, so
``stop(history[:t])`` is the decision after the ``t``-th entry, and a decision is never sticky (a
history that stops, followed by an improvement, does not stop). Hand-written predicates are
welcome; the built-in ones also have ``explain(history) -> str | None`` and ``monitors`` (the
metric names they read), which :func:`stop_reason` and :func:`any_of` / :func:`all_of` use.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from . import _validate as v
from ._types import describe

History: TypeAlias = Sequence[Mapping[str, float]]
Predicate: TypeAlias = Callable[[History], bool]

_NOT_A_HISTORY = "{who}: history must be a sequence of dicts of floats, oldest first, got {got}."
_NOT_AN_ENTRY = "{who}: history[{i}] must be a dict of metric names to floats, got {got}."
_NOT_A_NUMBER = (
    "{who}: history[{i}][{key!r}] must be a real number, got {got}. Convert metrics with "
    "float() once per epoch before adding them to the history."
)
_NO_METRIC = "{who}: no such metric in the latest history entry; available: {keys}."
_RETURNED_NONE = (
    "{name}(history) returned None; a stopping predicate must return True or False "
    "(is a return statement missing?)."
)


def _check_history(who: str, history: Any) -> None:
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise TypeError(_NOT_A_HISTORY.format(who=who, got=describe(history)))
    for i, entry in enumerate(history):
        if not isinstance(entry, Mapping):
            raise TypeError(_NOT_AN_ENTRY.format(who=who, i=i, got=describe(entry)))


def _num(x: float) -> str:
    """A float, shortened to 6 significant digits: ``0.412``, ``1e-05``, ``nan``."""
    return repr(float(f"{x:.6g}"))


def _epoch(entry: Mapping[str, Any], index: int) -> str:
    """The entry's integer ``"epoch"`` value, else its index in the history."""
    e = entry.get("epoch")
    if isinstance(e, numbers.Real) and not isinstance(e, bool) and float(e).is_integer():
        return str(int(float(e)))
    return str(index)


@dataclass(frozen=True)
class EarlyStopping:
    """The predicate returned by :func:`early_stopping`; its fields are the validated arguments."""

    monitor: str
    min_delta: float
    patience: int
    mode: str
    stopping_threshold: float | None
    divergence_threshold: float | None
    baseline: float | None
    check_finite: bool

    @property
    def monitors(self) -> tuple[str, ...]:
        return (self.monitor,)

    def __call__(self, history: History) -> bool:
        return self.explain(history) is not None

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def _improves(self, value: float, ref: float) -> bool:
        shift = self.min_delta if self.mode == "min" else -self.min_delta
        return self._better(value, ref - shift)

    def explain(self, history: History) -> str | None:
        """Why the predicate fires on ``history``, or ``None`` when it does not."""
        who = f"early_stopping(monitor={self.monitor!r})"
        _check_history(who, history)
        if not history:
            return None
        name, latest = self.monitor, history[-1]
        if name not in latest:
            keys = sorted(latest, key=str)
            raise ValueError(_NO_METRIC.format(who=who, keys=keys))
        best: float | None = None
        best_at, wait, value = "", 0, math.nan
        for i, entry in enumerate(history):
            if name not in entry:
                continue
            value = entry[name]
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(_NOT_A_NUMBER.format(who=who, i=i, key=name, got=describe(value)))
            if (
                math.isfinite(value)
                and (best is None or self._improves(value, best))
                and (self.baseline is None or self._improves(value, self.baseline))
            ):
                best, best_at, wait = value, _epoch(entry, i), 0
            else:
                wait += 1
        at = _epoch(latest, len(history) - 1)
        if self.check_finite and not math.isfinite(value):
            return f"{who}: {name} is not finite ({value}) at epoch {at}"
        stop_at, diverge_at = self.stopping_threshold, self.divergence_threshold
        if stop_at is not None and self._better(value, stop_at):
            shown = f"{name}={_num(value)} crossed stopping_threshold={_num(stop_at)}"
            return f"{who}: {shown} at epoch {at}"
        if diverge_at is not None and self._better(diverge_at, value):
            shown = f"{name}={_num(value)} diverged past divergence_threshold={_num(diverge_at)}"
            return f"{who}: {shown} at epoch {at}"
        if wait < self.patience:
            return None
        if best is not None:
            where = f"best {_num(best)} at epoch {best_at}"
        elif self.baseline is not None:
            where = f"nothing beat baseline={_num(self.baseline)}"
        else:
            where = "no finite value yet"
        checks = f"{wait} consecutive check" + ("s" if wait > 1 else "")
        return f"{who}: no improvement greater than {_num(self.min_delta)} in {checks} ({where})"


def early_stopping(
    monitor: str = "val_loss",
    min_delta: float = 0.0,
    patience: int = 3,
    mode: str = "min",
    *,
    stopping_threshold: float | None = None,
    divergence_threshold: float | None = None,
    baseline: float | None = None,
    check_finite: bool = True,
) -> EarlyStopping:
    """Stop when ``monitor`` has not improved for ``patience`` checks in a row.

    The rule in one sentence: stop when the latest value of ``monitor`` is non-finite (if
    ``check_finite``), strictly better than ``stopping_threshold``, or strictly worse than
    ``divergence_threshold``, or when each of the last ``patience`` checks failed to beat the best
    earlier value (and ``baseline``) by more than ``min_delta``. For ``mode="min"``, with ``vs``
    the monitor's values in the entries that have it (each such entry is one *check*)::

        best, wait = inf, 0                      # -inf, and ">" / "+ min_delta", for "max"
        for x in vs:
            if isfinite(x) and x < best - min_delta and x < baseline - min_delta:
                best, wait = x, 0                # an improvement (no baseline: that test is True)
            else:
                wait += 1                        # NaN and +-inf never improve
        stop = (check_finite and not isfinite(x)) or x < stopping_threshold \\
            or x > divergence_threshold or wait >= patience        # x = vs[-1]

    So a change of exactly ``min_delta`` is not an improvement, the first finite value is one
    (unless it fails to beat ``baseline``), and the stop comes at the ``patience``-th check in a
    row without improvement (as in Lightning and Keras; Flax's stops one check later). A
    ``baseline`` acts as if the best started there instead of at ``inf``. NaN never crosses a
    threshold; ``+-inf`` compare as numbers. Entries without ``monitor`` are skipped, but the
    latest entry must have it.

    Args:
        monitor: the metric's key in each history entry.
        min_delta: how much better than the best (and baseline) an improvement must be; finite,
            ``>= 0``.
        patience: how many checks in a row without improvement stop training; an int ``>= 1``.
        mode: ``"min"`` (smaller is better) or ``"max"``; never inferred from the name.
        stopping_threshold: stop as soon as the latest value is strictly better than this.
        divergence_threshold: stop as soon as the latest value is strictly worse than this.
        baseline: a value every improvement must also beat by more than ``min_delta``.
        check_finite: stop as soon as the latest value is NaN or infinite; if ``False``, such a
            value is a check without improvement (an infinite one may still cross a threshold).

    Returns:
        A frozen callable ``history -> bool`` with these arguments as attributes, ``monitors ==
        (monitor,)`` and ``explain(history)``, which gives the reason (see :func:`stop_reason`).
        Calling it on an empty history gives ``False``; a latest entry without ``monitor``
        raises ``ValueError`` listing the metrics it has.

    Example:
        >>> stop = early_stopping("val_loss", patience=2)
        >>> history = [{"epoch": 0, "val_loss": 1.0}, {"epoch": 1, "val_loss": 0.5},
        ...            {"epoch": 2, "val_loss": 0.7}, {"epoch": 3, "val_loss": 0.6}]
        >>> stop(history[:3]), stop(history)
        (False, True)
        >>> print(stop_reason(stop, history))
        early_stopping(monitor='val_loss'): no improvement greater than 0.0 in 2 consecutive checks (best 0.5 at epoch 1)
    """
    f = "early_stopping"
    if not isinstance(monitor, str):
        v.fail(f, "monitor", "must be a non-empty str", monitor, exc=TypeError)
    if not monitor:
        v.fail(f, "monitor", "must be a non-empty str", monitor)
    delta = v.nonnegative(f, "min_delta", min_delta)
    patience = v.positive_int(f, "patience", patience)
    v.one_of(f, "mode", mode, ["min", "max"])
    s, d, b = (
        None if x is None else v.finite(f, name, x)
        for name, x in [
            ("stopping_threshold", stopping_threshold),
            ("divergence_threshold", divergence_threshold),
            ("baseline", baseline),
        ]
    )
    if not isinstance(check_finite, bool):
        v.fail(f, "check_finite", "must be a bool", check_finite, exc=TypeError)
    if s is not None and d is not None and not (s < d if mode == "min" else s > d):
        side = "greater" if mode == "min" else "less"
        rule = f"must be {side} than stopping_threshold={s!r} for mode={mode!r}"
        fix = "Otherwise some values both stop and diverge."
        v.fail(f, "divergence_threshold", rule, divergence_threshold, fix)
    return EarlyStopping(monitor, delta, patience, mode, s, d, b, check_finite)


def _name(predicate: Any) -> str:
    return str(getattr(predicate, "__name__", repr(predicate)))


def _fires(predicate: Predicate, history: History) -> bool:
    result = predicate(history)
    if result is None:
        raise TypeError(_RETURNED_NONE.format(name=_name(predicate)))
    return bool(result)


def stop_reason(predicate: Predicate, history: History) -> str | None:
    """Why ``predicate`` stops on ``history``, or ``None`` when it does not.

    Uses ``predicate.explain(history)`` when there is one; otherwise a hand-written predicate
    that fires gets the reason ``"<its __name__> returned True"``.

    Example:
        >>> def too_long(history):
        ...     return len(history) >= 2
        >>> stop_reason(too_long, [{"loss": 1.0}]), stop_reason(too_long, [{"loss": 1.0}] * 2)
        (None, 'too_long returned True')
    """
    v.is_callable("stop_reason", "predicate", predicate, "a callable history -> bool")
    explain = getattr(predicate, "explain", None)
    if callable(explain):
        reason = explain(history)
        return None if reason is None else str(reason)
    return f"{_name(predicate)} returned True" if _fires(predicate, history) else None


def _members(
    func: str, predicates: tuple[Any, ...]
) -> tuple[tuple[Predicate, ...], tuple[str, ...]]:
    if not predicates:
        v.fail(func, "predicates", "must hold at least one predicate", predicates)
    monitors: list[str] = []
    for i, p in enumerate(predicates):
        v.is_callable(func, f"predicates[{i}]", p, "a callable history -> bool")
        monitors += [m for m in getattr(p, "monitors", ()) if m not in monitors]
    return predicates, tuple(monitors)


@dataclass(frozen=True)
class _Combination:
    """Several predicates asked together; subclasses say how their reasons combine."""

    predicates: tuple[Predicate, ...]
    monitors: tuple[str, ...]

    def __call__(self, history: History) -> bool:
        return self.explain(history) is not None

    def explain(self, history: History) -> str | None:
        # Every member is evaluated (no short circuit), so a misspelled monitor always raises.
        return self.combine([stop_reason(p, history) for p in self.predicates])

    def combine(self, reasons: list[str | None]) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class AnyOf(_Combination):
    """The predicate returned by :func:`any_of`: the first member's reason that fires."""

    def combine(self, reasons: list[str | None]) -> str | None:
        return next((r for r in reasons if r is not None), None)


@dataclass(frozen=True)
class AllOf(_Combination):
    """The predicate returned by :func:`all_of`: every member's reason, once all fire."""

    def combine(self, reasons: list[str | None]) -> str | None:
        return None if None in reasons else "; ".join(r for r in reasons if r is not None)


def any_of(*predicates: Predicate) -> AnyOf:
    """Stop when at least one of ``predicates`` fires; the reason is the first one's, in order.

    Example:
        >>> stop = any_of(early_stopping("val_loss"), early_stopping("loss", stopping_threshold=0.1))
        >>> stop.monitors, stop([{"loss": 0.05, "val_loss": 0.3}])
        (('val_loss', 'loss'), True)
    """
    return AnyOf(*_members("any_of", predicates))


def all_of(*predicates: Predicate) -> AllOf:
    """Stop when every one of ``predicates`` fires; the reason joins theirs with ``"; "``."""
    return AllOf(*_members("all_of", predicates))


def never(history: History) -> bool:
    """A predicate that never stops: train for the full number of epochs."""
    return False
