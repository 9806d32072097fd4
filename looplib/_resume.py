"""``fit``'s checkpoints: the :class:`Checkpoints` settings, saving, and resuming bit for bit.

A checkpoint directory holds the rotating checkpoints (see ``_rotate.py``) and ``history.jsonl``,
the run's history, one JSON line per epoch, appended at each epoch end before that epoch's
checkpoint is saved. A checkpoint holds the state (with the epoch's partial metric sums in its
tally), torch's global generator states, and as JSON the position in the data and how many
history lines belong to it; so every checkpoint has the same size, however long the run. On
resume the history file is cut back to those lines (lines written after the checkpoint, by a run
that was then killed, go).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import _rotate
from . import _tensorfile as tf
from . import _validate as v
from ._checkpoint import load_with_extra
from ._distributed import is_main_process
from ._rotate import DirectoryLock, latest_checkpoint, save_rotating
from ._tree import leaves_by_path
from ._types import History, TrainState

FORMAT = "looplib.fit"
VERSION = 2
HISTORY = "history.jsonl"
FOREIGN = (
    "fit(checkpoints={where}): the latest checkpoint there, {name}, was written by another run: "
    "{difference}. Resuming it would train other weights than the state passed in. Use another "
    "directory, or pass resume=False to start over in this one."
)


@dataclass(frozen=True)
class Checkpoints:
    """Where and when :func:`fit` saves checkpoints, and which it keeps.

    Args:
        directory: the checkpoint directory (created if missing; one run writes it at a time).
        every_batches: also save every this many batches (counted over the whole run), mid-epoch
            included; None: at epoch ends only.
        every_epochs: save at the end of every this many epochs (and at the run's last epoch
            when ``max_steps`` ends it).
        keep_last: how many of the latest checkpoints to keep (>= 1).
        keep_best: how many of the best checkpoints to keep besides, ranked by ``monitor`` at
            epoch ends (>= 0); used only with a ``monitor``.
        monitor: the history key that ranks epoch-end checkpoints (``"val_loss"``), or None for
            no ranking (then only the latest are kept).
        mode: ``"min"`` or ``"max"``: required with a ``monitor`` (looplib never guesses the
            direction from the name), and must be None without one.

    Example:
        >>> Checkpoints("runs/a", every_batches=500, monitor="val_loss", mode="min")
        Checkpoints('runs/a', every_batches=500, every_epochs=1, keep_last=3, keep_best=1, monitor='val_loss', mode='min')
    """

    directory: str | os.PathLike[str]
    every_batches: int | None = None
    every_epochs: int = 1
    keep_last: int = 3
    keep_best: int = 1
    monitor: str | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        f = "Checkpoints"
        if not isinstance(self.directory, (str, os.PathLike)):
            v.fail(f, "directory", "must be a path", self.directory, exc=TypeError)
        if self.every_batches is not None:
            v.positive_int(f, "every_batches", self.every_batches)
        v.positive_int(f, "every_epochs", self.every_epochs)
        v.positive_int(f, "keep_last", self.keep_last)
        v.nonnegative_int(f, "keep_best", self.keep_best)
        if self.monitor is not None and not isinstance(self.monitor, str):
            v.fail(
                f, "monitor", "must be a history key (a str) or None", self.monitor, exc=TypeError
            )
        if self.monitor is None and self.mode is not None:
            v.fail(f, "mode", "must be None without a monitor", self.mode)
        if self.monitor is not None:
            if self.mode is None:
                v.fail(
                    f,
                    "mode",
                    f"must be 'min' or 'max' with monitor={self.monitor!r}",
                    self.mode,
                    fix="looplib never guesses the direction from the metric's name.",
                )
            if not isinstance(self.mode, str):
                v.fail(f, "mode", "must be 'min' or 'max'", self.mode, exc=TypeError)
            v.one_of(f, "mode", self.mode, ("min", "max"))

    def __repr__(self) -> str:
        return (
            f"Checkpoints({str(self.directory)!r}, every_batches={self.every_batches}, "
            f"every_epochs={self.every_epochs}, keep_last={self.keep_last}, "
            f"keep_best={self.keep_best}, monitor={self.monitor!r}, mode={self.mode!r})"
        )


class CheckpointError(OSError):
    """A checkpoint of :func:`fit` could not be saved (a full disk, a directory made read-only).

    Nothing is lost: the checkpoints saved before are intact, and the error carries the run.

    Attributes:
        directory: the checkpoint directory.
        state: the trained state that was being saved.
        history: the history so far.
    """

    def __init__(self, message: str, directory: Path, state: TrainState, history: History) -> None:
        super().__init__(message)
        self.directory = directory
        self.state = state
        self.history = history


class Position(NamedTuple):
    """Where a run stands: the epoch, the next batch of that epoch, and the batches run in all."""

    epoch: int
    batch: int
    done: int


class Resumed(NamedTuple):
    state: TrainState
    history: History
    position: Position
    rng: dict[str, torch.Tensor]
    epoch_rng: dict[str, torch.Tensor] | None


def global_rng_states() -> dict[str, torch.Tensor]:
    """torch's global generator states (CPU, and every CUDA device there is)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            states[f"cuda:{i}"] = torch.cuda.get_rng_state(i)
    return states


def set_global_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    for key, value in states.items():
        if key.startswith("cuda:") and torch.cuda.is_available():
            index = int(key.split(":")[1])
            if index < torch.cuda.device_count():
                torch.cuda.set_rng_state(value, index)


def difference(saved: TrainState, given: TrainState) -> str | None:
    """The first difference in structure, shape or dtype between a checkpoint's state and the
    state passed in (params, buffers, optimizer state, step, and the slots both have)."""
    shared = sorted(set(saved.slots) & set(given.slots))
    pairs = [(getattr(saved, f), getattr(given, f), f) for f in ("params", "buffers", "opt_state")]
    pairs += [(saved.step, given.step, "step")]
    pairs += [(saved.slots[k], given.slots[k], f"slots[{k!r}]") for k in shared]
    for a, b, name in pairs:
        ours = leaves_by_path(b, f"state.{name}")
        theirs = leaves_by_path(a, f"state.{name}")
        for path, leaf in ours.items():
            if path not in theirs:
                return f"the state passed in has {path} ({_kind(leaf)}), the checkpoint has not"
            if _kind(theirs[path]) != _kind(leaf):
                return (
                    f"{path} is {_kind(theirs[path])} in the checkpoint and {_kind(leaf)} in the "
                    "state passed in"
                )
        for path, leaf in theirs.items():
            if path not in ours:
                return f"the checkpoint has {path} ({_kind(leaf)}), the state passed in has not"
    return None


def _kind(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    return type(x).__name__


class Checkpointer:
    """Writes ``fit``'s checkpoints and history into one directory and resumes from it."""

    def __init__(self, settings: Checkpoints) -> None:
        self.settings = settings
        self.directory = Path(settings.directory)
        self.lock: DirectoryLock | None = None
        self.main = is_main_process()

    def open(self) -> None:
        """Take the directory (in the process that writes), check it can be written, and clear
        what a killed run left behind: temporary files and checkpoints the index never listed.
        Everything that can fail before training does here."""
        if not self.main:
            return
        self.lock = _rotate._hold("fit", "checkpoints", self.directory)
        probe = self.directory / f".looplib-probe-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"looplib")
            probe.unlink()
        except OSError as e:
            self.close()
            tf.fail_path(
                "fit",
                "checkpoints",
                f"must be a writable directory ({e.strerror or e})",
                self.directory,
                exc=PermissionError,
            )
        _rotate._remove_temporaries(self.directory)
        _, entries = _rotate._read_index("fit", self.directory)
        _rotate._remove_orphans(self.directory, {e.tag for e in entries})

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def restore(self, given: TrainState) -> Resumed | None:
        """The latest checkpoint, checked against the state passed in; None if there is none."""
        path = latest_checkpoint(self.directory)
        if path is None:
            return None
        try:
            tree, extra = load_with_extra(path, map_location=given.step.device)
        except (ValueError, OSError) as e:
            v.add_note(
                e,
                f"fit: while resuming from {path}, the latest checkpoint in the checkpoint "
                "directory; fit never skips a checkpoint it cannot read. Restore the file, or "
                "pass resume=False (or another directory) to start over.",
            )
            raise
        if not isinstance(extra, dict) or extra.get("format") != FORMAT:
            v.fail(
                "fit",
                "checkpoints",
                f"must name a directory of checkpoints written by fit; {path.name} is not one",
                self.settings,
            )
        if extra.get("version") != VERSION:
            v.fail(
                "fit",
                "checkpoints",
                f"must hold checkpoints of this looplib's fit (version {VERSION}); {path.name} "
                f"has version {extra.get('version')}",
                self.settings,
                fix="Start a new directory.",
            )
        found = difference(tree["state"], given)
        if found is not None:
            where = repr(str(self.directory))
            raise ValueError(FOREIGN.format(where=where, name=path.name, difference=found))
        history = self._history(int(extra["epochs"]))
        set_global_rng_states(tree["rng"])
        position = Position(*extra["position"])
        return Resumed(tree["state"], history, position, tree["rng"], tree["epoch_rng"])

    def _history(self, epochs: int) -> History:
        """The first ``epochs`` lines of the history file; the file is cut back to them."""
        path = self.directory / HISTORY
        entries: History = []
        size = 0
        with open(path, "rb") as f:
            for _ in range(epochs):
                line = f.readline()
                if not line.endswith(b"\n"):
                    tf.fail_path(
                        "fit",
                        "checkpoints",
                        f"must hold the {epochs} history lines its latest checkpoint counts; "
                        f"{HISTORY} has {len(entries)}",
                        self.directory,
                        "Restore the file, or pass resume=False to start over.",
                    )
                entries.append(json.loads(line))
                size += len(line)
        if self.main:
            os.truncate(path, size)
        return entries

    def start(self, history: History) -> None:
        """Begin a new history file holding ``history`` (the epochs of an earlier run)."""
        if self.main:
            with open(self.directory / HISTORY, "wb") as f:
                f.write(b"".join(_line(entry) for entry in history))

    def append(self, entry: dict[str, float], state: TrainState, history: History) -> None:
        """Add one epoch to the history file, durably, before its checkpoint is saved."""
        if not self.main:
            return
        try:
            with open(self.directory / HISTORY, "ab") as f:
                f.write(_line(entry))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self._failed(e, state, history)

    def due(self, position: Position, epoch_end: bool) -> bool:
        if epoch_end:
            return (position.epoch + 1) % self.settings.every_epochs == 0
        every = self.settings.every_batches
        return every is not None and position.done % every == 0

    def save(
        self,
        state: TrainState,
        history: History,
        position: Position,
        epoch_rng: dict[str, torch.Tensor] | None,
        entry: dict[str, float] | None = None,
    ) -> None:
        """Save a checkpoint at ``position``: mid-epoch ones carry the generator states of the
        epoch's start (``epoch_rng``) to replay its data order; epoch-end ones are ranked by the
        monitored value of the epoch's ``entry``."""
        if not self.main:
            return
        s = self.settings
        metric = None if entry is None or s.monitor is None else entry.get(s.monitor)
        if metric is not None and not math.isfinite(metric):
            metric = None
        tree = {"state": state, "rng": global_rng_states(), "epoch_rng": epoch_rng}
        extra = {
            "format": FORMAT,
            "version": VERSION,
            "position": list(position),
            "epochs": len(history),
        }
        try:
            save_rotating(
                self.directory,
                tree,
                tag=position.done,
                extra=extra,
                keep_last=s.keep_last,
                best_metric=metric,
                keep_best=s.keep_best if s.monitor is not None else 0,
                mode=s.mode or "min",
            )
        except OSError as e:
            self._failed(e, state, history)

    def _failed(self, error: OSError, state: TrainState, history: History) -> None:
        raise CheckpointError(
            f"fit: could not save a checkpoint in {str(self.directory)!r}: {error}. The "
            "checkpoints saved before are intact, and the error's .state and .history hold the "
            "run so far: free space (or fix the directory's permissions) and call fit again to "
            "resume from the latest checkpoint, or save error.state yourself.",
            self.directory,
            state,
            history,
        ) from error


def _line(entry: dict[str, float]) -> bytes:
    return (json.dumps(entry) + "\n").encode("utf-8")
