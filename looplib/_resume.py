"""Periodic checkpoints of a ``fit`` run, and resuming one bit for bit."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import _rotate
from . import _validate as v
from ._checkpoint import load_with_extra
from ._distributed import is_main_process
from ._rotate import DirectoryLock, latest_checkpoint, save_rotating
from ._types import History, TrainState

FORMAT = "looplib.fit"


class Position(NamedTuple):
    """Where a run stands: the epoch, the next batch of that epoch, and the batches run in all."""

    epoch: int
    batch: int
    done: int


class Resumed(NamedTuple):
    state: TrainState
    history: History
    position: Position
    meter: dict[str, Any] | None
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


class Checkpointer:
    """Writes ``fit``'s checkpoints into one directory and finds the one to resume from.

    A checkpoint holds the state, the partial epoch's metric sums, torch's global generator
    states, and (as JSON) the history and the position in the data, so that resuming replays
    exactly what an uninterrupted run would have done.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        every_epochs: int,
        every_batches: int | None,
        keep_last: int,
        keep_best: int,
        monitor: str,
        mode: str,
    ) -> None:
        self.directory = Path(directory)
        self.every_epochs = every_epochs
        self.every_batches = every_batches
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor = monitor
        self.mode = mode
        self._last: tuple[int, float | None] | None = None  # tag and metric of the last checkpoint

    def lock(self) -> DirectoryLock | None:
        """Hold the directory for this run, in the process that writes the checkpoints (None
        elsewhere, or when this process already holds it)."""
        if not is_main_process():
            return None
        return _rotate._hold("fit", "checkpoint_dir", self.directory)

    def restore(self) -> Resumed | None:
        path = latest_checkpoint(self.directory)
        if path is None:
            return None
        try:
            tree, extra = load_with_extra(path)
        except (ValueError, OSError) as e:
            v.add_note(
                e,
                f"fit: while resuming from {path}, the latest checkpoint in checkpoint_dir; "
                "fit never skips a checkpoint it cannot read. Restore the file, or pass "
                "resume=False (or another checkpoint_dir) to start over.",
            )
            raise
        if not isinstance(extra, dict) or extra.get("format") != FORMAT:
            v.fail(
                "fit",
                "checkpoint_dir",
                f"must hold checkpoints written by fit; {path.name} is not one",
                str(self.directory),
            )
        set_global_rng_states(tree["rng"])
        position = Position(*extra["position"])
        self._last = (position.done, _rotate._metric(self.directory, position.done))
        return Resumed(
            tree["state"], extra["history"], position, tree["meter"], tree["rng"], tree["epoch_rng"]
        )

    def due(self, position: Position, epoch_end: bool) -> bool:
        if epoch_end:
            return (position.epoch + 1) % self.every_epochs == 0
        return self.every_batches is not None and position.done % self.every_batches == 0

    def save(
        self,
        state: TrainState,
        history: History,
        position: Position,
        meter: dict[str, Any] | None,
        entry: dict[str, float] | None,
        epoch_rng: dict[str, torch.Tensor] | None,
        rng: dict[str, torch.Tensor] | None = None,
    ) -> Path | None:
        """Save a checkpoint at ``position``: mid-epoch ones carry the epoch's metric sums
        (``meter``) and the generator states from the epoch's start (``epoch_rng``), to replay
        the epoch's data order; epoch-end ones carry the epoch's history ``entry``, whose
        monitored value ranks the checkpoint. ``rng`` is the generator states to resume with
        (default: the current ones)."""
        if not is_main_process():
            return None
        metric = None if entry is None else entry.get(self.monitor)
        if metric is not None and not math.isfinite(metric):
            metric = None
        last_tag, last_metric = self._last or (None, None)
        if metric is None and last_metric is not None and last_tag == position.done:
            # The last checkpoint (an epoch end's, ranked) holds this very state: this is a save
            # of the last good state before the next epoch's first batch. Keep it and its rank.
            return self.directory / _rotate._file_name(position.done)
        self._last = (position.done, metric)
        tree = {
            "state": state,
            "meter": meter,
            "rng": global_rng_states() if rng is None else rng,
            "epoch_rng": epoch_rng,
        }
        extra = {"format": FORMAT, "history": history, "position": list(position)}
        return save_rotating(
            self.directory,
            tree,
            tag=position.done,
            extra=extra,
            keep_last=self.keep_last,
            best_metric=metric,
            keep_best=self.keep_best,
            mode=self.mode,
        )
