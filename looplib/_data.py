"""What ``fit`` does to the batches, as wrappers around them: an epoch's batches, the data
limits (``train_fraction``, ``overfit_fraction``) and the share of one rank."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from typing import Any

from . import _validate as v
from ._distributed import shard
from ._types import describe


def batches_used(n: int, fraction: float) -> int:
    """How many of ``n`` batches an epoch uses for a data fraction: ``max(1, floor(f * n))``.

    ``f`` is taken as the decimal number written (``0.29`` is exactly 29/100, not its binary
    approximation), so ``batches_used(100, 0.29) == 29``. A positive fraction always uses at least
    one batch (when there is one), never more than ``n``.

    Args:
        n: the number of batches, a non-negative int.
        fraction: a real number in [0, 1].

    >>> batches_used(10, 0.25), batches_used(10, 0.01), batches_used(100, 0.29)
    (2, 1, 29)
    """
    n = v.nonnegative_int("batches_used", "n", n)
    f = exact_fraction("batches_used", "fraction", fraction, allow_zero=True)
    if n == 0 or f == 0:
        return 0
    return min(n, max(1, math.floor(f * n)))


def exact_fraction(func: str, arg: str, value: Any, *, allow_zero: bool) -> Fraction:
    x = v.in_range(func, arg, value, 0.0, 1.0, closed="[]" if allow_zero else "(]")
    return Fraction(repr(float(x)))


def is_reiterable(batches: Any) -> bool:
    return isinstance(batches, Iterable) and not isinstance(batches, Iterator)


def length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


class Take:
    """The first ``n`` batches of a re-iterable, itself re-iterable and with a length."""

    def __init__(self, batches: Iterable[Any], n: int) -> None:
        self.batches = batches
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Any]:
        if self.n == 0:
            return
        for i, batch in enumerate(self.batches):
            yield batch
            if i + 1 >= self.n:
                return


def take(batches: Iterable[Any], fraction: float) -> Iterable[Any]:
    """The first ``batches_used(len(batches), fraction)`` batches (see :func:`batches_used`)."""
    if fraction == 1:
        return batches
    n = length(batches)
    if n is None:
        v.fail(
            "fit",
            "train_fraction",
            "needs batches with a length (a list or DataLoader)",
            fraction,
            fix=f"Got batches of type {describe(batches)}.",
        )
    keep = batches_used(n, fraction)
    return batches[:keep] if isinstance(batches, Sequence) else Take(batches, keep)


def for_rank(arg: str, batches: Any, size: int) -> list[Any]:
    """This rank's share of ``batches`` (``shard``), which must be a sequence."""
    if isinstance(batches, Sequence):
        return shard(batches)
    v.fail(
        "fit",
        arg,
        f"must be a sequence for fit to shard it across the {size} ranks",
        batches,
        exc=TypeError,
        fix="For a DataLoader with a DistributedSampler, or batches each rank already chose, "
        "pass shard=False.",
    )


def epoch_source(
    train_batches: Any, *, train_fraction: float, overfit_fraction: float
) -> tuple[Callable[[int], Iterable[Any]], list[Any] | None]:
    """``epoch -> batches`` for ``fit``, and the fixed overfit batches (None without).

    Called once per epoch: a function of the epoch is called with it; a loader whose sampler
    has ``set_epoch`` gets it called; ``train_fraction`` takes the first batches;
    ``overfit_fraction > 0`` fixes the first batches of epoch 0 for every epoch.
    """

    def batches(epoch: int) -> Iterable[Any]:
        if callable(train_batches) and not is_reiterable(train_batches):
            made = train_batches(epoch)
            if not isinstance(made, Iterable):
                v.fail(
                    "fit",
                    "train_batches",
                    "must return an iterable of batches",
                    made,
                    exc=TypeError,
                )
            return made
        set_epoch = getattr(getattr(train_batches, "sampler", None), "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        return train_batches

    if overfit_fraction > 0:
        first = list(batches(0))
        fixed = first[: batches_used(len(first), overfit_fraction)]
        return (lambda epoch: fixed), fixed
    return (lambda epoch: take(batches(epoch), train_fraction)), None
