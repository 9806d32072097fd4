"""``fit``: a short loop of :func:`epoch` calls, with validation, stopping, checkpoints and logs."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch

from . import _validate as v
from ._checkpoint import load_with_extra
from ._data import epoch_source, exact_fraction, for_rank, is_reiterable, length
from ._distributed import agree, all_reduce_metrics, broadcast_state, world
from ._ema import with_ema_params
from ._epoch import AnyStep, Where, check_step, layout, prepare, run_epoch
from ._guard import MESSAGE, NonFiniteLossError
from ._guard import SLOT as GUARD
from ._resume import (
    Checkpointer,
    Checkpoints,
    Position,
    global_rng_states,
    set_global_rng_states,
)
from ._rotate import best_checkpoint
from ._skip import SLOT as SKIP
from ._step import weighted_mean
from ._stopping import Predicate, stop_reason
from ._tally import SLOT as TALLY
from ._tally import Tally
from ._tally import reset as reset_tally
from ._types import History, Metrics, TrainState
from .loggers import Logger, check_logger


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
        state: the final training state.
        history: one dict per epoch, oldest first (see :func:`fit`).
        stop_reason: why training ended, in words (``"max_epochs=10 reached"``, the early
            stopping rule that fired, ...).
        best: the epoch-end state with the best ``monitor`` value (ties: the earlier), or None
            without a ``monitor``.
    """

    state: TrainState
    history: list[dict[str, float]]
    stop_reason: str
    best: TrainState | None = None


def evaluate(step: AnyStep, state: TrainState, batches: Iterable[Any]) -> dict[str, float]:
    """Evaluate ``state`` on ``batches``: eval mode, no gradients, metrics averaged by weight.

    Every metric the loss returns (and ``loss``) is averaged over all samples of all batches
    (weighted by each batch's weight, the sample count by default), then turned into a Python
    float with one host read. Under ``torch.distributed`` each rank passes its own batches and
    the average is over all ranks' samples, the same on every rank.

    Returns:
        ``{"loss": ..., **metrics}`` as floats (no ``weight`` key); ``{}`` for no batches.
    """
    check_step("evaluate", step)
    if not isinstance(state, TrainState):
        v.fail("evaluate", "state", "must be a looplib TrainState", state, exc=TypeError)
    if not isinstance(batches, Iterable):
        v.fail("evaluate", "batches", "must be an iterable of batches", batches, exc=TypeError)
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
    if means["weight"].numel() > 1:  # an ensemble: per member, and the members' mean
        return _floats({k: m for k, m in means.items() if k != "weight"})
    floats = _floats(means)
    total = floats.pop("weight")
    return all_reduce_metrics({k: x * total for k, x in floats.items()}, total)


def _floats(metrics: Metrics) -> dict[str, float]:
    """Tensors to Python floats with one host read (float64, so int counts stay exact).

    An ensemble's metric (one value per member, see ``ll.vmap``) becomes ``name`` (the members'
    mean) and ``name/0``, ``name/1``, ...: one number each, so the history, the loggers and the
    stopping rules see floats either way.
    """
    if not metrics:
        return {}
    flat = [m.detach().reshape(-1).to(torch.float64) for m in metrics.values()]
    values = torch.cat([torch.cat([f.mean().reshape(1), f]) if f.numel() > 1 else f for f in flat])
    numbers = iter(values.cpu().tolist())
    out: dict[str, float] = {}
    for name, f in zip(metrics, flat, strict=True):
        out[name] = next(numbers)
        if f.numel() > 1:
            for i in range(f.numel()):
                out[f"{name}/{i}"] = next(numbers)
    return out


def fit(
    step: AnyStep,
    state: TrainState,
    train_batches: Iterable[Any] | Callable[[int], Iterable[Any]],
    val: Iterable[Any] | None = None,
    *,
    min_epochs: int = 1,
    max_epochs: int = 1000,
    max_steps: int | None = None,
    stop: Predicate | None = None,
    monitor: str | None = None,
    mode: str | None = None,
    train_fraction: float = 1.0,
    overfit_fraction: float = 0.0,
    shard: bool = True,
    history: History | None = None,
    check_finite: bool = True,
    validate_with: str = "params",
    checkpoints: Checkpoints | None = None,
    resume: bool = True,
    loggers: Sequence[Logger] = (),
    log_every: int = 50,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_epoch_end: Callable[[TrainState, dict[str, float]], None] | None = None,
    progress: bool | None = None,
) -> FitResult:
    """Train ``state`` with ``step`` for several epochs, validating and stopping by rule.

    In plain Python (checkpoints, logs and distributed details aside)::

        for e in range(len(history), max_epochs):
            state = ll.epoch(step, state, batches(e))     # stops early at max_steps
            entry = {"epoch": e, "step": ..., "batches": ..., "skipped": ...,
                     **epoch_means(state), **val_(evaluate(step, state, val)), "time": ...}
            history.append(entry)
            if max_steps reached or (len(history) >= min_epochs and stop(history)):
                break
        return FitResult(state, history, reason, best)

    Training stops at the first of ``max_epochs`` epochs, ``max_steps`` optimizer updates (never
    run past either), or ``stop(history)`` returning True, asked after every epoch from the
    ``min_epochs``-th on. The predicate is re-evaluated from the whole history each time, so
    nothing is sticky. There is no early stopping unless you ask for it:
    ``stop=ll.early_stopping("val_loss", patience=3)``.

    The history has one dict per epoch, in this key order: ``epoch`` (0-based), ``step``
    (updates so far), ``batches`` (run this epoch), ``skipped`` (updates ``ll.skip_nonfinite``
    skipped this epoch), the training metrics over the epoch's applied updates (``loss`` and the
    loss's metrics averaged by sample weight; ``lr`` and tracked gradient norms per update), the
    validation metrics prefixed ``val_`` and ``time`` (seconds).

    Non-finite values (``check_finite=True``): every update is guarded; one whose loss is not
    finite, or that would leave a NaN or infinity in the params or the optimizer state, is never
    applied, and the state stays at the last good update. fit finds it at its next read point
    (a log point, a checkpoint, the epoch's end) and raises :class:`NonFiniteLossError`, whose
    ``.state`` is that last good state. No state fit returns, hands to a callback or saves holds
    a non-finite param or optimizer value. With ``ll.skip_nonfinite(n)`` in the chain, bad
    gradients are skipped instead (counted in ``skipped``, left out of the epoch's metrics) until
    more than ``n`` come in a row. ``check_finite=False`` removes the guard.

    Host reads: the step itself reads nothing. fit reads the device every ``log_every`` updates
    (one stacked read of the per-step values, plus the chain's checks), before each checkpoint,
    at each epoch's end (one read of the epoch's sums), and, with ``max_steps``, after each
    update once the limit may be near.

    Args:
        step: a :class:`Step` from :func:`train_step` and transformers (or a compiled one).
        state: the state to start from (from :func:`init`, or a checkpoint).
        train_batches: a re-iterable of batches (a list, a ``DataLoader``), or a function
            ``epoch -> batches`` for a different order each epoch. A ``DataLoader`` whose sampler
            has ``set_epoch`` gets it called every epoch.
        val: a re-iterable of validation batches, or None.
        min_epochs: the fewest epochs before ``stop`` may end training (>= 0).
        max_epochs: the most epochs (>= 1, >= ``min_epochs``).
        max_steps: the most optimizer updates, or None.
        stop: a predicate ``history -> bool`` (``ll.early_stopping(...)``), or None for none.
        monitor: a history key ranking the epoch-end states for ``result.best``, or None.
        mode: ``"min"`` or ``"max"``, required with ``monitor`` (never guessed), else None.
        train_fraction: the fraction of batches used per epoch, in (0, 1]: the first
            :func:`batches_used` ``(n, f)`` of them.
        overfit_fraction: if > 0, train and validate every epoch on the first
            ``batches_used(n, f)`` batches of epoch 0 (overrides ``train_fraction`` and ``val``).
        shard: under ``torch.distributed``, give rank r of N the batches ``r, r + N, ...`` of
            each epoch's sequence and of ``val`` (see :func:`shard`); False: each rank's batches
            are its own already (a ``DataLoader`` with a ``DistributedSampler``).
        history: the history of earlier epochs, to continue a run (epochs count on from it).
        check_finite: guard every update against non-finite values (see above).
        validate_with: ``"params"``, or ``"ema"`` to validate with the averaged weights of
            ``ll.ema`` in the chain (``ll.with_ema_params(state)``: the averaged params in place
            of ``state.params``).
        checkpoints: a :class:`Checkpoints` (directory, how often, what to keep), or None.
        resume: with ``checkpoints``, continue from the latest checkpoint in the directory.
        loggers: loggers (``ll.loggers.CSV``, ``JSONL``, ``TensorBoard``) given each update's
            values (every ``log_every`` updates, in one read) and each epoch's history entry.
        log_every: how many updates between reads of the per-step values (>= 1).
        on_step: ``on_step(step, values)`` for each update's values, as the loggers get them.
        on_epoch_end: ``on_epoch_end(state, entry)`` after each epoch.
        progress: a progress bar per epoch (tqdm) on the main process: True, False, or None
            for a bar only when stderr is a terminal.

    Checkpoints and resuming: fit saves atomically (see :func:`save_rotating`) the state (with
    the partial epoch's sums), the position in the data and torch's global generator states;
    the history goes to ``history.jsonl`` in the directory, one line per epoch. Called again
    with the same directory it resumes from the latest checkpoint, bit for bit on the CPU,
    mid-epoch included, provided each epoch's batches come in the same order (a list, a function
    of the epoch, or a DataLoader drawing its shuffle from torch's global generator). A
    checkpoint from another run (other shapes, dtypes, optimizer) raises, naming the first
    difference. A run that already stopped stays stopped. A failed save raises
    :class:`CheckpointError` with the state, the checkpoints before it intact.

    Data parallel: with a process group and ``pmean()`` in the chain, fit broadcasts the state
    from rank 0, shards the batches (``shard``), averages the epoch's metrics over the ranks (so
    every rank takes the same decisions), agrees on non-finite updates across ranks, and shows
    progress, logs and checkpoints (at epoch ends) on rank 0 only.

    Returns:
        a :class:`FitResult` ``(state, history, stop_reason, best)``.
    """
    run = _Run(step, state, train_batches, val, locals(), world())  # checks every argument
    state, history, reason = run.begin(state)
    epoch = run.position.epoch
    try:
        for epoch in range(run.position.epoch, run.max_epochs):
            if reason is not None:
                break
            started = time.perf_counter()
            state, batches = run.train(epoch, state)
            entry, state = run.record(epoch, state, batches)
            if run.val is not None:
                chosen = state if run.validate_with == "params" else run.with_ema(state)
                entry.update(
                    {f"val_{k}": x for k, x in evaluate(run.step, chosen, run.val).items()}
                )
            entry["time"] = time.perf_counter() - started
            history.append(entry)
            run.keep(epoch, state, entry, history)
            reason = run.finished(history, state)
    except NonFiniteLossError as e:
        e.history, e.epoch = history, epoch
        raise
    finally:
        run.close()
    return FitResult(state, history, reason or run.default_reason, run.best)


class _Run:
    """One call of :func:`fit`: its validated settings and what it tracks between epochs."""

    def __init__(
        self, step: Any, state: Any, train: Any, val: Any, a: dict[str, Any], where: Any
    ) -> None:
        check_step("fit", step)
        v.train_state("fit", state)
        self.min_epochs = v.nonnegative_int("fit", "min_epochs", a["min_epochs"])
        self.max_epochs = v.positive_int("fit", "max_epochs", a["max_epochs"])
        if self.min_epochs > self.max_epochs:
            v.fail("fit", "min_epochs", f"must be <= max_epochs={self.max_epochs}", self.min_epochs)
        ms = a["max_steps"]
        self.max_steps = None if ms is None else v.positive_int("fit", "max_steps", ms)
        train_fraction = float(
            exact_fraction("fit", "train_fraction", a["train_fraction"], allow_zero=False)
        )
        overfit = float(
            exact_fraction("fit", "overfit_fraction", a["overfit_fraction"], allow_zero=True)
        )
        for name in ("shard", "check_finite", "resume"):
            if not isinstance(a[name], bool):
                v.fail("fit", name, "must be a bool", a[name], exc=TypeError)
        if a["progress"] is not None and not isinstance(a["progress"], bool):
            v.fail("fit", "progress", "must be True, False or None", a["progress"], exc=TypeError)
        if not callable(train) and not is_reiterable(train):
            v.fail(
                "fit",
                "train_batches",
                "must be re-iterable (a list or DataLoader) or a function epoch -> batches",
                train,
                exc=TypeError,
                fix="A generator is used up after one epoch; wrap it: lambda epoch: make_batches().",
            )
        if val is not None and not is_reiterable(val):
            v.fail(
                "fit",
                "val",
                "must be re-iterable (a list or DataLoader) or None",
                val,
                exc=TypeError,
            )
        stop = a["stop"]
        if stop is not None:
            v.is_callable("fit", "stop", stop, "a predicate history -> bool, or None")
        self.monitor, self.mode = _monitor(a["monitor"], a["mode"])
        self.validate_with = v.one_of("fit", "validate_with", a["validate_with"], ("params", "ema"))
        if self.validate_with == "ema" and not any(s.slot == "ema" for s in step.stages):
            v.fail("fit", "validate_with", "'ema' needs ll.ema in the step's chain", "ema")
        checkpoints = a["checkpoints"]
        if checkpoints is not None and not isinstance(checkpoints, Checkpoints):
            v.fail(
                "fit",
                "checkpoints",
                "must be ll.Checkpoints(directory, ...) or None",
                checkpoints,
                exc=TypeError,
            )
        self.loggers = list(_sequence("loggers", a["loggers"]))
        for i, logger in enumerate(self.loggers):
            check_logger("fit", f"loggers[{i}]", logger)
        self.log_every = v.positive_int("fit", "log_every", a["log_every"])
        for name in ("on_step", "on_epoch_end"):
            if a[name] is not None:
                v.is_callable("fit", name, a[name], "a function, or None")
        self.on_step, self.on_epoch_end = a["on_step"], a["on_epoch_end"]
        self.source, fixed = epoch_source(
            train, train_fraction=train_fraction, overfit_fraction=overfit
        )
        self.val = fixed if fixed is not None else val
        for name in getattr(stop, "monitors", ()):
            if name.startswith("val_") and self.val is None:
                v.fail(
                    "fit",
                    "stop",
                    f"monitors {name!r}, which needs validation data",
                    stop,
                    fix="Pass val=..., or monitor a training metric such as 'loss'.",
                )
        self.rank, self.size = where
        self.shard = a["shard"]
        if self.size > 1 and checkpoints is not None and checkpoints.every_batches is not None:
            v.fail(
                "fit",
                "checkpoints",
                f"must save at epoch ends only under torch.distributed ({self.size} ranks): a "
                "mid-epoch position and partial sums differ from rank to rank",
                checkpoints,
                fix="Leave every_batches=None.",
            )
        if self.size > 1 and self.shard and self.val is not None:
            self.val = for_rank("val", self.val, self.size)
        self.stop = stop
        self.step = step
        self.prepared = prepare(step, a["check_finite"])
        self.history = [dict(e) for e in (a["history"] or [])]
        self.resume = a["resume"]
        self.ckpt = Checkpointer(checkpoints) if checkpoints is not None else None
        show = a["progress"] if a["progress"] is not None else sys.stderr.isatty()
        self.progress = show and self.rank == 0
        self.log = self.rank == 0 and (bool(self.loggers) or self.on_step is not None)
        self.where = Where("fit")
        self.best: TrainState | None = None
        self.best_value = math.nan
        self.default_reason = f"max_epochs={self.max_epochs} reached"
        self.position = Position(len(self.history), 0, 0)
        self.resumed: Any = None
        self.started = False
        self.logged = -1  # the last step whose values went to the loggers

    # -- the run's start and end ------------------------------------------------------------
    def begin(self, state: TrainState) -> tuple[TrainState, History, str | None]:
        """Take the checkpoint directory and resume from it, or start; returns the state, the
        history and a stop reason if the run had already finished."""
        if self.ckpt is not None:
            self.ckpt.open()
            try:
                self.resumed = self.ckpt.restore(state) if self.resume else None
                if self.resumed is None:
                    self.ckpt.start(self.history)
            except BaseException:
                self.ckpt.close()
                raise
        if self.resumed is not None:
            state, self.history, self.position = self.resumed[:3]
            self._restore_best()
        self.skipped = _skip_total(state)
        self.step_count = int(state.step.reshape(-1)[0])
        self.done = self.position.done  # batches run in all, over the whole run
        reason = self.finished(self.history, state) if self.history and self.resumed else None
        return state, self.history, reason

    def _restore_best(self) -> None:
        assert self.ckpt is not None
        s = self.ckpt.settings
        if self.monitor is None or (s.monitor, s.mode) != (self.monitor, self.mode):
            return
        path = best_checkpoint(self.ckpt.directory)
        if path is not None:
            tree, extra = load_with_extra(path, map_location=self.resumed.state.step.device)
            self.best = tree["state"]
            self.best_value = self.history[extra["epochs"] - 1][self.monitor]

    def close(self) -> None:
        if self.rank == 0:
            for logger in self.loggers:
                logger.close()
        if self.ckpt is not None:
            self.ckpt.close()

    # -- an epoch ---------------------------------------------------------------------------
    def train(self, epoch: int, state: TrainState) -> tuple[TrainState, int]:
        """Run one epoch (or the rest of a resumed one); returns the state and its batch count."""
        first = self.position.batch if epoch == self.position.epoch else 0
        if first:
            set_global_rng_states(self.resumed.epoch_rng)
        self.epoch_rng = global_rng_states() if self.ckpt is not None else None
        batches = self.source(epoch)
        if self.size > 1 and self.shard:
            batches = for_rank("train_batches", batches, self.size)
        total = length(batches)
        stream = iter(batches)
        for _ in range(first):
            next(stream)
        if first:
            set_global_rng_states(self.resumed.rng)
        self.epoch, self.ran, self.reached = epoch, first, False
        self.pending: list[torch.Tensor] = []
        self.since = self.calls = 0
        self.deferred = False
        self.bar = _bar(self.progress, epoch, total, first)
        self.where.context = f"epoch {epoch}, "
        try:
            state, ran = run_epoch(
                self.prepared,
                state,
                stream,
                reset=first == 0,
                flush=True,
                after=self.after,
                where=self.where,
                start=first,
                prepare_state=None if self.started or self.size == 1 else broadcast_state,
            )
            self.started = True
            if ran == 0 and first > 0:  # resumed at the epoch's very end
                state = self.prepared.flush(state)
            if ran + first == 0:
                v.fail("fit", "train_batches", "must yield at least one batch per epoch", [])
            self.read(state)
        finally:
            if self.bar is not None:
                self.bar.close()
        return state, ran + first

    def after(self, work: TrainState, ran: int) -> bool:
        """After each whole window: progress, per-step values, reads, mid-epoch checkpoints."""
        group, self.ran = ran - self.ran, ran
        self.done += group
        if self.bar is not None:
            self.bar.update(group)
        if self.log:
            values = [m.to(torch.float64) for k, m in work.metrics.items() if k != "weight"]
            self.pending.append(torch.stack([work.step.to(torch.float64), *values]))
        # At most one update per whole window (per batch without accumulate). Under tbptt_split
        # a batch holds an unknown number of updates: with max_steps, read after each batch.
        step = self.prepared
        if step.split is not None:
            self.since += self.max_steps or 0
        else:
            self.since += 1 if step.window > 1 else group
        self.calls += 1
        here = Position(self.epoch, ran, self.done)
        save = self.ckpt is not None and (self.ckpt.due(here, epoch_end=False) or self.deferred)
        # A mid-epoch checkpoint is taken between accumulation windows only (one host read of
        # the window's count): an open window holds gradients the guard has not yet seen.
        self.deferred = save and step.window > 1 and step.position(work) != 0
        save = save and not self.deferred
        near = self.max_steps is not None and self.step_count + self.since >= self.max_steps
        if save or near or self.calls >= self.log_every:
            self.read(work)
        if near and self.step_count >= self.max_steps:  # type: ignore[operator]
            self.reached = True
            return True
        if save:
            assert self.ckpt is not None
            self.ckpt.save(work, self.history, here, self.epoch_rng)
        return False

    def read(self, work: TrainState) -> None:
        """A read point: the pending per-step values and the step count in one host read, then
        the chain's checks (the non-finite guard agreed over the ranks)."""
        extra = [work.step.reshape(-1)[0].to(torch.float64)]
        if self.bar is not None:
            extra.append(work.metrics["loss"].reshape(-1)[0].to(torch.float64))
        rows = torch.stack(self.pending) if self.pending else None
        parts = ([rows.flatten()] if rows is not None else []) + [torch.stack(extra)]
        host = torch.cat(parts).cpu().tolist()
        self.step_count = int(host[len(host) - len(extra)])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{host[-1]:.4g}", refresh=False)
        if rows is not None:
            self._log_rows(work, host, rows.shape)
        self.pending, self.since, self.calls = [], 0, 0
        # One rank's refused update stops every rank (no rank is left waiting for the others).
        if self.size > 1 and GUARD in work.slots and agree(bool(work.slots[GUARD].tripped.any())):
            raise NonFiniteLossError(MESSAGE.format(at=self.step_count), work)
        self.prepared.check(work)

    def _log_rows(self, work: TrainState, host: list[float], shape: Any) -> None:
        keys = [k for k in work.metrics if k != "weight"]
        n, width = shape
        for i in range(n):
            row = host[i * width : (i + 1) * width]
            step = int(row[0])
            if step <= self.logged:
                continue  # no update was applied (skipped, or refused by the guard)
            self.logged = step
            values = dict(zip(keys, row[1:], strict=True))
            for logger in self.loggers:
                logger.log_step(step, values)
            if self.on_step is not None:
                self.on_step(step, values)

    def record(
        self, epoch: int, state: TrainState, batches: int
    ) -> tuple[dict[str, Any], TrainState]:
        """The epoch's history entry (one host read of its sums); the state's sums reset."""
        sums: Tally = state.slots[TALLY]
        if sums.weight.numel() > 1:  # an ensemble: each member's means, and their mean
            total = state.slots[SKIP].total if SKIP in state.slots else None
            skipped = 0 if total is None else int(total.sum()) - self.skipped
            self.skipped += skipped
            members: dict[str, Any] = {
                "epoch": epoch,
                "step": int(state.step.reshape(-1)[0]),
                "batches": batches,
                "skipped": skipped,
            }
            members.update(_floats(sums.means()))
            return members, reset_tally(state)
        skip = (
            state.slots[SKIP].total.max()
            if SKIP in state.slots
            else torch.zeros((), dtype=torch.int64)
        )
        counts = {"\0step": state.step.reshape(-1)[0], "\0skip": skip.to(state.step.device)}
        floats = _floats(
            {**sums.weighted, **sums.per_update, "\0w": sums.weight, "\0n": sums.updates, **counts}
        )
        weight, updates = floats.pop("\0w"), floats.pop("\0n")
        step_count, skipped = int(floats.pop("\0step")), int(floats.pop("\0skip"))
        entry: dict[str, Any] = {
            "epoch": epoch,
            "step": step_count,
            "batches": batches,
            "skipped": skipped - self.skipped,
        }
        self.skipped = skipped
        entry.update(all_reduce_metrics({k: floats[k] for k in sums.weighted}, weight))
        entry.update(all_reduce_metrics({k: floats[k] for k in sums.per_update}, updates))
        return entry, reset_tally(state)

    def with_ema(self, state: TrainState) -> TrainState:
        return with_ema_params(state)

    def keep(self, epoch: int, state: TrainState, entry: dict[str, Any], history: History) -> None:
        """Log the entry, call on_epoch_end, track the best state, save the epoch's checkpoint."""
        if self.ckpt is not None:
            self.ckpt.append(entry, state, history)
        if self.rank == 0:
            for logger in self.loggers:
                logger.log_epoch(entry)
        if self.on_epoch_end is not None:
            self.on_epoch_end(state, entry)
        if self.monitor is not None:
            if self.monitor not in entry:
                v.fail(
                    "fit",
                    "monitor",
                    f"must name a history key; available: {sorted(entry)}",
                    self.monitor,
                )
            value = entry[self.monitor]
            better = value < self.best_value if self.mode == "min" else value > self.best_value
            if math.isfinite(value) and (self.best is None or better):
                self.best, self.best_value = state, value
        due = self.ckpt is not None and self.ckpt.due(Position(epoch, 0, self.done), True)
        if self.ckpt is not None and (self.reached or due):
            self.ckpt.save(state, history, Position(epoch + 1, 0, self.done), None, entry)

    def finished(self, history: History, state: TrainState) -> str | None:
        """Why a run whose last epoch is ``history[-1]`` ends there, or None to go on."""
        if self.max_steps is not None and history and history[-1]["step"] >= self.max_steps:
            return f"max_steps={self.max_steps} reached"
        if self.stop is not None and len(history) >= max(self.min_epochs, 1):
            fired = stop_reason(self.stop, history)
            if fired is not None:
                return fired
        if len(history) >= self.max_epochs:
            return self.default_reason
        return None


def _monitor(monitor: Any, mode: Any) -> tuple[str | None, str | None]:
    if monitor is not None and not isinstance(monitor, str):
        v.fail("fit", "monitor", "must be a history key (a str) or None", monitor, exc=TypeError)
    if monitor is None:
        if mode is not None:
            v.fail("fit", "mode", "must be None without a monitor", mode)
        return None, None
    if mode is None:
        v.fail(
            "fit",
            "mode",
            f"must be 'min' or 'max' with monitor={monitor!r}",
            mode,
            fix="looplib never guesses the direction from the metric's name.",
        )
    if not isinstance(mode, str):
        v.fail("fit", "mode", "must be 'min' or 'max'", mode, exc=TypeError)
    return monitor, v.one_of("fit", "mode", mode, ("min", "max"))


def _sequence(arg: str, value: Any) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        v.fail("fit", arg, "must be a list of loggers", value, exc=TypeError)
    return value


def _skip_total(state: TrainState) -> int:
    return int(state.slots[SKIP].total.max()) if SKIP in state.slots else 0


def _bar(enabled: bool, epoch: int, total: int | None, first: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=first,
        desc=f"epoch {epoch}",
        leave=True,
        dynamic_ncols=True,
        file=sys.stderr,
    )
