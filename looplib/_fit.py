"""``fit``: the epoch loop, with validation, epoch limits, early stopping and data limits."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import torch
from torch.utils.data import DistributedSampler

from . import _validate as v
from ._compile import CompiledStep
from ._distributed import agree, all_reduce_metrics, broadcast_state, shard, world
from ._resume import Checkpointer, Position, global_rng_states, set_global_rng_states
from ._step import Step, weighted_mean
from ._stopping import Predicate, early_stopping, stop_reason
from ._tally import SLOT as TALLY
from ._tally import Tally, tally
from ._tally import reset as reset_tally
from ._types import History, Metrics, TrainState, describe


class _Default:
    def __repr__(self) -> str:
        return "<default>"


DEFAULT: Any = _Default()
"""The default of ``fit(stop=...)``: early stopping on ``val_loss`` when there is validation."""


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
        state: the final training state.
        history: one dict of floats per epoch, oldest first (see :func:`fit`).
        stop_reason: why training ended, in words (``"max_epochs=10 reached"``, the early
            stopping rule that fired, ...).
    """

    state: TrainState
    history: list[dict[str, float]]
    stop_reason: str


class NonFiniteLossError(FloatingPointError):
    """Raised by :func:`fit` when a training loss is NaN or infinite.

    Attributes:
        state: the last good state, from before the step that produced the non-finite loss.
        history: the history of the completed epochs.
        epoch: the epoch index of the bad batch.
        batch: the batch index within the epoch.
    """

    def __init__(
        self, message: str, state: TrainState, history: History, epoch: int, batch: int
    ) -> None:
        super().__init__(message)
        self.state = state
        self.history = history
        self.epoch = epoch
        self.batch = batch


def _parse_fraction(func: str, arg: str, value: Any, *, allow_zero: bool) -> Fraction:
    x = v.in_range(func, arg, value, 0.0, 1.0, closed="[]" if allow_zero else "(]")
    return Fraction(repr(float(x)))


def batches_used(n: int, fraction: float) -> int:
    """How many of ``n`` batches an epoch uses for a data fraction: ``max(1, floor(f * n))``.

    ``f`` is taken as the decimal number written (``0.29`` is exactly 29/100, not its binary
    approximation), so ``batches_used(100, 0.29) == 29``. A positive fraction always uses at least
    one batch (when there is one), never more than ``n``.

    >>> batches_used(10, 0.25), batches_used(10, 0.01), batches_used(100, 0.29)
    (2, 1, 29)
    """
    f = Fraction(repr(float(fraction)))
    if n == 0 or f == 0:
        return 0
    return min(n, max(1, math.floor(f * n)))


def _is_reiterable(batches: Any) -> bool:
    return isinstance(batches, Iterable) and not isinstance(batches, Iterator)


def evaluate(
    step: Step | CompiledStep, state: TrainState, batches: Iterable[Any]
) -> dict[str, float]:
    """Evaluate ``state`` on ``batches``: eval mode, no gradients, metrics averaged by weight.

    Every metric the loss returns (and ``loss``) is averaged over all samples of all batches
    (weighted by each batch's weight, the sample count by default), then turned into a Python
    float with one host sync. Under ``torch.distributed`` each rank passes its own batches and
    the average is over all ranks' samples, the same on every rank.

    Returns:
        ``{"loss": ..., **metrics}`` as floats (no ``weight`` key); ``{}`` for no batches.
    """
    if not isinstance(step, (Step, CompiledStep)):
        v.fail("evaluate", "step", "must be a looplib Step", step, exc=TypeError)
    parts = []
    for index, batch in enumerate(batches):
        try:
            parts.append(step.evaluate(state, batch))
        except Exception as e:
            v.add_note(e, f"evaluate: while evaluating batch {index}: {layout(batch)}")
            raise
    if not parts:
        return {}
    means = weighted_mean(parts)
    floats = _to_floats(means)
    total = floats.pop("weight")
    return all_reduce_metrics({k: x * total for k, x in floats.items()}, total)


def layout(batch: Any, depth: int = 0) -> str:
    """A batch's structure for error notes: containers as written, tensors by shape and dtype.

    >>> layout((torch.zeros(8, 3), {"y": torch.zeros(8, dtype=torch.int64)}))
    "(Tensor(shape=(8, 3), dtype=torch.float32), {'y': Tensor(shape=(8,), dtype=torch.int64)})"
    """
    if isinstance(batch, torch.Tensor):
        return describe(batch)
    if depth >= 4:
        return "..."
    if isinstance(batch, Mapping):
        items = [f"{k!r}: {layout(x, depth + 1)}" for k, x in list(batch.items())[:6]]
        more = [f"... ({len(batch)} entries)"] if len(batch) > 6 else []
        return "{" + ", ".join(items + more) + "}"
    if isinstance(batch, (list, tuple)):
        items = [layout(x, depth + 1) for x in batch[:6]]
        more = [f"... ({len(batch)} items)"] if len(batch) > 6 else []
        text = ", ".join(items + more)
        if isinstance(batch, list):
            return f"[{text}]"
        name = type(batch).__name__ if hasattr(batch, "_fields") else ""
        return f"{name}({text}{',' if len(batch) == 1 and not name else ''})"
    return describe(batch, 40)


def _to_floats(metrics: Metrics, skip: Sequence[str] = ()) -> dict[str, float]:
    keys = [k for k in metrics if k not in skip]
    if not keys:
        return {}
    values = torch.stack([metrics[k].detach().reshape(()).to(torch.float64).cpu() for k in keys])
    return dict(zip(keys, values.tolist(), strict=True))


def _with_tally(step: Step | CompiledStep) -> Step | CompiledStep:
    """``step`` with the epoch tally as its last stage (see ``_tally.py``)."""
    if isinstance(step, CompiledStep):
        inner = step.step.replace(stages=(*step.step.stages, tally()))
        return CompiledStep(
            inner, mode=step.mode, donate=step.donate, fallback=step.fallback, options={}
        )
    return step.replace(stages=(*step.stages, tally()))


def _epoch_means(sums: Tally) -> dict[str, float]:
    """The epoch's averages as floats (one host sync), over all ranks when distributed."""
    floats = _to_floats(
        {**sums.weighted, **sums.per_update, "\0weight": sums.weight, "\0updates": sums.updates}
    )
    weight, updates = floats.pop("\0weight"), floats.pop("\0updates")
    loss_side = {k: floats[k] for k in sums.weighted}
    per_update = {k: floats[k] for k in sums.per_update}
    means = all_reduce_metrics(loss_side, weight)
    means.update(all_reduce_metrics(per_update, updates))
    return means


def _check_monitors(stop: Any, has_val: bool) -> None:
    for name in getattr(stop, "monitors", ()):
        if name.startswith("val_") and not has_val:
            v.fail(
                "fit",
                "stop",
                f"monitors {name!r}, which needs validation data",
                stop,
                fix="Pass val=... batches, or monitor a training metric such as 'loss'.",
            )


def fit(
    step: Step | CompiledStep,
    state: TrainState,
    train_batches: Iterable[Any] | Callable[[int], Iterable[Any]],
    val: Iterable[Any] | None = None,
    *,
    min_epochs: int = 1,
    max_epochs: int = 1000,
    max_steps: int | None = None,
    stop: Predicate | None = DEFAULT,
    train_fraction: float = 1.0,
    overfit_fraction: float = 0.0,
    history: History | None = None,
    progress: bool = True,
    check_finite: bool = True,
    on_epoch_end: Callable[[TrainState, dict[str, float]], None] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1,
    checkpoint_every_batches: int | None = None,
    keep_last: int = 3,
    keep_best: int = 1,
    resume: bool = True,
    shard_data: bool | None = None,
) -> FitResult:
    """Train ``state`` with ``step`` for several epochs, validating and stopping by rule.

    Each epoch folds ``step`` over the epoch's batches, ends a partial accumulation window with
    ``step.flush`` (the ``accumulate(..., partial=...)`` policy), evaluates on ``val`` and appends
    one entry to the history. Training then stops at the first of:

    * ``max_epochs`` epochs, or ``max_steps`` optimizer updates (never run past either);
    * ``stop(history)`` returning True, asked after every epoch from the ``min_epochs``-th on
      (never stop before the minimum). The predicate is re-evaluated from the whole history each
      epoch, so nothing is sticky: a rule met during the minimum epochs stops training only if it
      still holds once the minimum is reached.

    The default ``stop`` is ``early_stopping("val_loss", patience=3, mode="min")`` when ``val``
    is given and none otherwise; ``stop=None`` disables early stopping; any predicate over the
    history replaces it. Monitoring a ``val_`` metric without ``val`` is an error.

    The history has one dict of floats per epoch: ``epoch`` (0-based), ``step`` (optimizer
    updates so far), ``batches`` (run this epoch), the training metrics averaged over the epoch
    (``loss`` and the loss's metrics by sample weight; tracked gradient norms over the updates),
    the validation metrics prefixed ``val_``, and ``time`` (seconds). Metric tensors become
    Python floats once per epoch.

    Data limits: ``train_fraction`` uses the first ``max(1, floor(f * n))`` of the ``n`` batches
    each epoch (see :func:`batches_used`); ``overfit_fraction > 0`` overrides it and both trains
    and validates on the same first ``max(1, floor(f * n))`` batches every epoch.

    Args:
        step: a :class:`Step` from :func:`train_step` and transformers.
        state: the state to start from (from :func:`init`, or a checkpoint).
        train_batches: a re-iterable of batches (a list, a ``DataLoader``), or a function
            ``epoch -> batches`` for a different order each epoch. A ``DataLoader`` whose sampler
            has ``set_epoch`` (e.g. ``DistributedSampler``) gets it called every epoch.
        val: a re-iterable of validation batches, or None.
        min_epochs: the fewest epochs before ``stop`` may end training (>= 0).
        max_epochs: the most epochs (>= 1, >= ``min_epochs``).
        max_steps: the most optimizer updates, or None (checking it reads the step counter
            after every batch).
        stop: a predicate ``history -> bool``, ``None``, or the default described above.
        train_fraction: the fraction of batches used per epoch, in (0, 1].
        overfit_fraction: if > 0, train and validate on this fraction of the first batches.
        history: the history of earlier epochs, to continue a run (epochs count on from it).
        progress: show a progress bar (tqdm; works in notebooks).
        check_finite: stop with :class:`NonFiniteLossError` at the first NaN or infinite
            training loss (reads the loss after every batch), keeping the last good state.
        on_epoch_end: called as ``on_epoch_end(state, entry)`` after each epoch (e.g. to save).
        checkpoint_dir: a directory for periodic checkpoints (see below), or None.
        checkpoint_every: save after every this many epochs.
        checkpoint_every_batches: also save after every this many batches (counted over the
            whole run), mid-epoch included; None for epoch ends only.
        keep_last: how many of the latest checkpoints to keep.
        keep_best: how many of the best checkpoints to keep besides, ranked by the early
            stopping monitor (``val_loss`` with validation, else ``loss``) at epoch ends.
        resume: continue from the latest checkpoint in ``checkpoint_dir`` when there is one.
        shard_data: under ``torch.distributed``, whether fit gives each rank its share of the
            batches (see below); None shards sequences and trusts a ``DataLoader`` with a
            ``DistributedSampler``; False means every rank already yields its own batches.

    Checkpoints and resuming: with ``checkpoint_dir``, fit writes checkpoints atomically (see
    :func:`save_rotating`) holding the state, the history, the position in the data, the partial
    epoch's metric sums and torch's global generator states. Called again with the same
    directory, it resumes from the latest one and the run continues as if never interrupted, bit
    for bit on the CPU, mid-epoch included, provided each epoch's batches come in the same order
    (a list, a function of the epoch, or a DataLoader drawing its shuffle from torch's global
    generator). A run that already stopped stays stopped. A non-finite loss saves the last good
    state before raising.

    An error raised while a batch runs (a batch of the wrong shape or type, say) propagates
    unchanged, with a note (``exc.__notes__``) naming the epoch, the batch index, the batch's
    layout and that of the run's first batch.

    Data parallel: run one process per rank (``torchrun``) with a process group initialized
    and ``pmean()`` in the chain. Then fit broadcasts the state from rank 0 at the start, gives
    rank r of N the batches ``r, r + N, ...`` of each epoch's sequence (see :func:`shard`; a
    ``DataLoader`` with a ``DistributedSampler`` gets its ``set_epoch`` instead), averages the
    epoch's training and validation metrics over all ranks (so the history, and every decision
    taken on it, is the same on every rank), checks the loss's finiteness on all ranks together
    (one rank's NaN stops them all, with no rank left waiting), shows progress and writes
    checkpoints on rank 0 only. Checkpoints are taken at epoch ends, where the state is the same
    on every rank, so a run checkpointed on N ranks resumes on M.

    Returns:
        a :class:`FitResult` ``(state, history, stop_reason)``.
    """
    if not isinstance(step, (Step, CompiledStep)):
        v.fail("fit", "step", "must be a looplib Step (from ll.train_step)", step, exc=TypeError)
    if not isinstance(state, TrainState):
        v.fail("fit", "state", "must be a looplib TrainState (from ll.init)", state, exc=TypeError)
    min_epochs = v.nonnegative_int("fit", "min_epochs", min_epochs)
    max_epochs = v.positive_int("fit", "max_epochs", max_epochs)
    if min_epochs > max_epochs:
        v.fail("fit", "min_epochs", f"must be <= max_epochs={max_epochs}", min_epochs)
    if max_steps is not None:
        max_steps = v.positive_int("fit", "max_steps", max_steps)
    _parse_fraction("fit", "train_fraction", train_fraction, allow_zero=False)
    _parse_fraction("fit", "overfit_fraction", overfit_fraction, allow_zero=True)
    if not callable(train_batches) and not _is_reiterable(train_batches):
        v.fail(
            "fit",
            "train_batches",
            "must be re-iterable (a list or DataLoader) or a function epoch -> batches",
            train_batches,
            exc=TypeError,
            fix="A generator is used up after one epoch; wrap it: lambda epoch: make_batches().",
        )
    if val is not None and not _is_reiterable(val):
        v.fail(
            "fit", "val", "must be re-iterable (a list or DataLoader) or None", val, exc=TypeError
        )
    if overfit_fraction > 0 and callable(train_batches) and not _is_reiterable(train_batches):
        initial = list(train_batches(0))
    elif overfit_fraction > 0:
        initial = list(train_batches)  # type: ignore[arg-type]
    else:
        initial = []
    if overfit_fraction > 0:
        fixed = initial[: batches_used(len(initial), overfit_fraction)]
        val = fixed
    has_val = val is not None
    if stop is DEFAULT:
        stop = early_stopping("val_loss", patience=3, mode="min") if has_val else None
    if stop is not None:
        v.is_callable("fit", "stop", stop, "a predicate history -> bool, or None")
        _check_monitors(stop, has_val)
    for name, value in (("progress", progress), ("check_finite", check_finite)):
        if not isinstance(value, bool):
            v.fail("fit", name, "must be a bool", value, exc=TypeError)

    if checkpoint_every_batches is not None:
        checkpoint_every_batches = v.positive_int(
            "fit", "checkpoint_every_batches", checkpoint_every_batches
        )
    checkpointer = None
    if checkpoint_dir is not None:
        if not isinstance(checkpoint_dir, (str, os.PathLike)):
            v.fail("fit", "checkpoint_dir", "must be a path or None", checkpoint_dir, exc=TypeError)
        monitor = getattr(stop, "monitor", "val_loss" if has_val else "loss")
        checkpointer = Checkpointer(
            checkpoint_dir,
            every_epochs=v.positive_int("fit", "checkpoint_every", checkpoint_every),
            every_batches=checkpoint_every_batches,
            keep_last=v.positive_int("fit", "keep_last", keep_last),
            keep_best=v.nonnegative_int("fit", "keep_best", keep_best),
            monitor=monitor,
            mode=getattr(stop, "mode", "min"),
        )
    if not isinstance(resume, bool):
        v.fail("fit", "resume", "must be a bool", resume, exc=TypeError)

    if shard_data is not None and not isinstance(shard_data, bool):
        v.fail("fit", "shard_data", "must be True, False or None", shard_data, exc=TypeError)
    rank, size = world()
    if size > 1:
        if checkpoint_every_batches is not None:
            v.fail(
                "fit",
                "checkpoint_every_batches",
                f"is not supported under torch.distributed ({size} ranks): a mid-epoch position "
                "and the epoch's partial sums differ from rank to rank",
                checkpoint_every_batches,
                fix="Checkpoint at epoch ends (checkpoint_every=...), where every rank agrees.",
            )
        if val is not None:
            val = _for_rank("val", val, size, shard_data)
    history = [dict(entry) for entry in (history or [])]
    position = Position(len(history), 0, 0)
    resumed = checkpointer.restore() if checkpointer is not None and resume else None
    if resumed is not None:
        state, position = resumed.state, resumed.position
        history = [dict(entry) for entry in resumed.history]
        done = _finished(history, min_epochs, max_epochs, max_steps, stop, state)
        if done is not None:
            return FitResult(state, history, done)
    step = _with_tally(step)
    started_up = False
    # One writer per checkpoint directory, for the whole run (released however it ends).
    lock = checkpointer.lock() if checkpointer is not None else None
    bar = _progress_bar(progress and rank == 0)
    reason = f"max_epochs={max_epochs} reached"
    done_batches = position.done
    first_layout: tuple[int, int, str] | None = None
    try:
        for epoch in range(position.epoch, max_epochs):
            started = time.perf_counter()
            mid_epoch = resumed is not None and epoch == position.epoch and position.batch > 0
            if mid_epoch:
                assert resumed is not None and resumed.epoch_rng is not None
                set_global_rng_states(resumed.epoch_rng)
            epoch_rng = global_rng_states() if checkpointer is not None else None
            batches = fixed if overfit_fraction > 0 else _epoch_batches(train_batches, epoch)
            if overfit_fraction == 0 and train_fraction < 1:
                batches = _limit(batches, train_fraction)
            if size > 1:
                batches = _for_rank("train_batches", batches, size, shard_data)
            counted = 0
            reached_max = False
            if bar is not None:
                bar.reset(total=_length(batches))
                bar.set_description(f"epoch {epoch}")
            iterator = iter(batches)
            first = 0
            if mid_epoch:
                assert resumed is not None
                first = position.batch
                for _ in range(first):
                    next(iterator)
                set_global_rng_states(resumed.rng)
                counted = first
                if bar is not None:
                    bar.update(first)
            for index, batch in enumerate(iterator, start=first):
                if not started_up:
                    try:
                        state = step.init(state, batch)
                    except Exception as e:
                        v.add_note(e, _batch_note(epoch, index, batch, first_layout))
                        raise
                    if size > 1:
                        state = broadcast_state(state)
                    started_up = True
                before = state
                # The generators before this batch: a checkpoint of the last good state must
                # replay the batch's random draws (at batch 0, from the epoch's start).
                rng_before = None
                if checkpointer is not None and check_finite:
                    rng_before = epoch_rng if index == 0 else global_rng_states()
                try:
                    state = step(state, batch)
                except Exception as e:
                    v.add_note(e, _batch_note(epoch, index, batch, first_layout))
                    raise
                if first_layout is None:
                    first_layout = (epoch, index, layout(batch))
                if check_finite and not _all_finite(state.metrics["loss"], size):
                    if checkpointer is not None:
                        checkpointer.save(
                            before,
                            history,
                            Position(epoch, index, done_batches),
                            None,
                            None,
                            epoch_rng,
                            rng=rng_before,
                        )
                    raise NonFiniteLossError(
                        f"fit: the training loss is {float(state.metrics['loss'])} at epoch "
                        f"{epoch}, batch {index}; the returned error's .state is the last good "
                        "state (from before this batch). Lower the learning rate, clip the "
                        "gradient, or compose ll.skip_nonfinite to skip such steps.",
                        before,
                        history,
                        epoch,
                        index,
                    )
                counted += 1
                done_batches += 1
                if bar is not None:
                    bar.update(1)
                    if index % 10 == 0:
                        bar.set_postfix(loss=f"{float(state.metrics['loss']):.4g}")
                if max_steps is not None and int(state.step) >= max_steps:
                    reached_max = True
                    break
                here = Position(epoch, index + 1, done_batches)
                if checkpointer is not None and checkpointer.due(here, epoch_end=False):
                    checkpointer.save(state, history, here, None, None, epoch_rng)
            if counted == 0:
                v.fail(
                    "fit", "train_batches", "must yield at least one batch per epoch", train_batches
                )
            if not reached_max:
                state = step.flush(state)
            entry: dict[str, float] = {"epoch": epoch, "step": int(state.step)}
            entry["batches"] = counted
            entry.update(_epoch_means(state.slots[TALLY]))
            state = reset_tally(state)  # so an epoch-end checkpoint is the next epoch's start
            if has_val:
                assert val is not None
                entry.update({f"val_{k}": x for k, x in evaluate(step, state, val).items()})
            entry["time"] = time.perf_counter() - started
            history.append(entry)
            if on_epoch_end is not None:
                on_epoch_end(state, entry)
            if checkpointer is not None and (
                reached_max or checkpointer.due(Position(epoch, 0, done_batches), epoch_end=True)
            ):
                checkpointer.save(
                    state, history, Position(epoch + 1, 0, done_batches), None, entry, None
                )
            finished = _finished(history, min_epochs, max_epochs, max_steps, stop, state)
            if finished is not None:
                reason = finished
                break
    finally:
        if bar is not None:
            bar.close()
        if lock is not None:
            lock.release()
    return FitResult(state, history, reason)


def _all_finite(loss: torch.Tensor, size: int) -> bool:
    """Whether the loss is finite, on every rank when distributed (all ranks then agree)."""
    finite = bool(torch.isfinite(loss).all())
    return finite if size == 1 else not agree(not finite)


def _for_rank(arg: str, batches: Any, size: int, shard_data: bool | None) -> Any:
    """This rank's share of ``batches`` under torch.distributed."""
    if shard_data is False:
        return batches
    if isinstance(batches, Sequence):
        return shard(batches)
    if shard_data is None and isinstance(getattr(batches, "sampler", None), DistributedSampler):
        return batches
    v.fail(
        "fit",
        arg,
        f"must be a sequence (fit shards it across the {size} ranks) or a DataLoader with a "
        "DistributedSampler, under torch.distributed",
        batches,
        exc=TypeError,
        fix="Pass shard_data=False if each rank already yields its own batches.",
    )


def _finished(
    history: History,
    min_epochs: int,
    max_epochs: int,
    max_steps: int | None,
    stop: Predicate | None,
    state: TrainState,
) -> str | None:
    """Why a run whose last epoch is ``history[-1]`` ends there, or None to go on."""
    if max_steps is not None and int(state.step) >= max_steps:
        return f"max_steps={max_steps} reached"
    if stop is not None and len(history) >= max(min_epochs, 1):
        fired = stop_reason(stop, history)
        if fired is not None:
            return fired
    if len(history) >= max_epochs:
        return f"max_epochs={max_epochs} reached"
    return None


def _batch_note(epoch: int, index: int, batch: Any, first: tuple[int, int, str] | None) -> str:
    """Where a step failed inside ``fit``, and the layout of the first batch that ran."""
    note = f"fit: while training on epoch {epoch}, batch {index}: {layout(batch)}"
    if first is not None and first[2] != layout(batch):
        note += f"; the first batch of this run (epoch {first[0]}, batch {first[1]}) was {first[2]}"
    return note + "."


def _epoch_batches(train_batches: Any, epoch: int) -> Iterable[Any]:
    if callable(train_batches) and not _is_reiterable(train_batches):
        batches = train_batches(epoch)
        if not isinstance(batches, Iterable):
            v.fail(
                "fit", "train_batches", "must return an iterable of batches", batches, exc=TypeError
            )
        return batches
    sampler = getattr(train_batches, "sampler", None)
    set_epoch = getattr(sampler, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)
    return train_batches


def _length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _limit(batches: Iterable[Any], fraction: float) -> Iterable[Any]:
    n = _length(batches)
    if n is None:
        v.fail(
            "fit",
            "train_fraction",
            "needs batches with a length (a list or DataLoader)",
            fraction,
            fix=f"Got batches of type {describe(batches)}.",
        )
    keep = batches_used(n, fraction)
    if isinstance(batches, Sequence):
        return batches[:keep]
    return _Take(batches, keep)


class _Take:
    def __init__(self, batches: Iterable[Any], n: int) -> None:
        self.batches = batches
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.batches):
            if i >= self.n:
                return
            yield batch


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=None, leave=False, dynamic_ncols=True)
