"""Loggers for :func:`looplib.fit`: where the per-step values and the epoch history go.

A logger is any object with three methods; ``fit`` calls them on the main process only::

    log_step(step: int, values: dict[str, float])   # per-step values, read every log_every updates
    log_epoch(entry: dict[str, float])              # each epoch's history entry
    close()                                          # at the end of fit, however it ends

The per-step values are ``state.metrics`` after an update (the loss and the loss's metrics
averaged over the update's micro-batches, the learning rate ``lr`` and any tracked gradient
norms), as floats. A logger opens its file at its first write, appending, so one logger can serve
several calls of ``fit``; after a resume, the steps between the last checkpoint and the
interruption are logged again.

Example:
    >>> import looplib as ll, tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     log = ll.loggers.JSONL(os.path.join(d, "log.jsonl"))
    ...     log.log_step(10, {"loss": 0.5})
    ...     log.log_epoch({"epoch": 0, "step": 10, "loss": 0.5})
    ...     log.close()
    ...     print(Path(d, "log.jsonl").read_text().strip())
    {"kind": "step", "step": 10, "loss": 0.5}
    {"kind": "epoch", "epoch": 0, "step": 10, "loss": 0.5}
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import IO, Any, Protocol

from . import _validate as v

__all__ = ["CSV", "JSONL", "Logger", "TensorBoard"]


class Logger(Protocol):
    """What ``fit(loggers=[...])`` calls (see the module)."""

    def log_step(self, step: int, values: dict[str, float]) -> None: ...

    def log_epoch(self, entry: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def check_logger(func: str, arg: str, logger: Any) -> None:
    """Raise unless ``logger`` has the three methods of a :class:`Logger`."""
    missing = [
        m for m in ("log_step", "log_epoch", "close") if not callable(getattr(logger, m, None))
    ]
    if missing:
        v.fail(
            func,
            arg,
            f"must be a logger with log_step, log_epoch and close methods (missing {missing})",
            logger,
            exc=TypeError,
            fix="Use ll.loggers.CSV(path), ll.loggers.JSONL(path) or ll.loggers.TensorBoard(dir).",
        )


def _path(func: str, path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        v.fail(func, "path", "must be a file path", path, exc=TypeError)
    p = Path(path)
    if p.is_dir():
        v.fail(func, "path", "must be a file path, not a directory", str(p))
    return p


class _File:
    """A text file opened for appending at the first write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[str] | None = None

    def open(self) -> IO[str]:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        return self.file

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class JSONL:
    """One JSON object a line: ``{"kind": "step", "step": ..., **values}`` and
    ``{"kind": "epoch", **entry}``.

    Args:
        path: the file; created with its directory if missing, appended to otherwise.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file = _File(_path("JSONL", path))

    def __repr__(self) -> str:
        return f"JSONL({str(self._file.path)!r})"

    def _write(self, row: dict[str, Any]) -> None:
        f = self._file.open()
        f.write(json.dumps(row) + "\n")
        f.flush()

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self._write({"kind": "step", "step": step, **values})

    def log_epoch(self, entry: dict[str, float]) -> None:
        self._write({"kind": "epoch", **entry})

    def close(self) -> None:
        self._file.close()


class CSV:
    """A CSV file in long form, one value a row: ``kind,epoch,step,name,value``.

    The columns never change, whatever the metrics (``kind`` is ``step`` or ``epoch``;
    ``epoch`` is empty on step rows), so the file stays valid as keys come and go;
    ``pandas.read_csv(path).pivot_table(index=["kind", "step"], columns="name")`` makes it wide.

    Args:
        path: the file; created with its directory (and the header) if missing, appended to
            otherwise.
    """

    HEADER = ("kind", "epoch", "step", "name", "value")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file = _File(_path("CSV", path))

    def __repr__(self) -> str:
        return f"CSV({str(self._file.path)!r})"

    def _rows(self, rows: list[tuple[Any, ...]]) -> None:
        new = not self._file.path.exists() or self._file.path.stat().st_size == 0
        f = self._file.open()
        writer = csv.writer(f)
        if new:
            writer.writerow(self.HEADER)
        writer.writerows(rows)
        f.flush()

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self._rows([("step", "", step, k, repr(x)) for k, x in values.items()])

    def log_epoch(self, entry: dict[str, float]) -> None:
        epoch, step = entry.get("epoch", ""), entry.get("step", "")
        rest = [(k, x) for k, x in entry.items() if k not in ("epoch", "step")]
        self._rows([("epoch", epoch, step, k, repr(x)) for k, x in rest])

    def close(self) -> None:
        self._file.close()


class TensorBoard:
    """Scalars for TensorBoard (``torch.utils.tensorboard.SummaryWriter``).

    Per-step values go under ``step/<name>`` and epoch entries under ``epoch/<name>``, both at
    the optimizer update count. Needs the ``tensorboard`` package (``pip install
    looplib[tensorboard]``).

    Args:
        log_dir: the directory of the event files.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        if not isinstance(log_dir, (str, os.PathLike)):
            v.fail("TensorBoard", "log_dir", "must be a directory path", log_dir, exc=TypeError)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "TensorBoard(log_dir=...): needs the tensorboard package; install it with "
                "`pip install looplib[tensorboard]`."
            ) from e
        self.log_dir = str(log_dir)
        self._writer_type = SummaryWriter
        self._writer: Any = None

    def __repr__(self) -> str:
        return f"TensorBoard({self.log_dir!r})"

    def _open(self) -> Any:
        if self._writer is None:
            self._writer = self._writer_type(self.log_dir)
        return self._writer

    def log_step(self, step: int, values: dict[str, float]) -> None:
        writer = self._open()
        for k, x in values.items():
            writer.add_scalar(f"step/{k}", x, step)

    def log_epoch(self, entry: dict[str, float]) -> None:
        writer = self._open()
        step = int(entry.get("step", 0))
        for k, x in entry.items():
            if k != "step":
                writer.add_scalar(f"epoch/{k}", x, step)
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
