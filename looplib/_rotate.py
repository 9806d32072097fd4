"""A directory of rotating checkpoints: keep the latest few and the best few.

Built on :mod:`looplib._checkpoint`'s atomic writes; ``fit`` uses it for periodic checkpoints.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from . import _checkpoint as ck
from ._types import describe
from ._validate import fail, nonnegative_int, one_of, positive_int

__all__ = ["best_checkpoint", "latest_checkpoint", "save_rotating"]

_INDEX = "index.json"
_INDEX_FORMAT = "looplib.checkpoint-index"
_BAD_INDEX = (
    "It is not a valid checkpoint index ({detail}). Each checkpoint file is self-contained and "
    "loads with load(); delete index.json to start a fresh index."
)


class _Entry(NamedTuple):
    tag: int
    metric: float | None


def _file_name(tag: int) -> str:
    return f"ckpt-{tag:08d}.pt"


def _read_index(func: str, directory: Path) -> tuple[str | None, list[_Entry]]:
    """The index's mode and entries, oldest save first; ``(None, [])`` when there is none."""
    path = directory / _INDEX
    try:
        text = path.read_bytes().decode("utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None, []

    def bad(detail: str) -> NoReturn:
        fail(
            func,
            "directory",
            "must hold a valid index.json",
            str(directory),
            _BAD_INDEX.format(detail=detail),
        )

    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        bad("not JSON")
    if type(data) is not dict or data.get("format") != _INDEX_FORMAT or data.get("version") != 1:
        bad("no format marker or an unknown version")
    mode, rows = data.get("mode"), data.get("checkpoints")
    if mode not in ("min", "max") or type(rows) is not list:
        bad("no mode or no checkpoint list")
    entries = []
    for row in rows:
        tag = row.get("tag") if type(row) is dict else None
        metric = row.get("metric") if type(row) is dict else None
        # The file name is derived from the tag and checked, so an index can never name, and so
        # never delete, a file outside the directory.
        if type(tag) is not int or tag < 0 or row.get("file") != _file_name(tag):
            bad(f"entry {describe(row)}")
        if metric is not None and (type(metric) not in (int, float) or math.isnan(metric)):
            bad(f"entry {describe(row)}")
        entries.append(_Entry(tag, None if metric is None else float(metric)))
    return mode, entries


def _write_index(directory: Path, mode: str, entries: list[_Entry]) -> None:
    rows = [{"file": _file_name(e.tag), "tag": e.tag, "metric": e.metric} for e in entries]
    data = {"format": _INDEX_FORMAT, "version": 1, "mode": mode, "checkpoints": rows}
    payload = (json.dumps(data, indent=1) + "\n").encode("utf-8")
    ck._atomic_write(directory / _INDEX, lambda f: ck._write_chunk(f, payload))


def _ranked(entries: list[_Entry], mode: str) -> list[int]:
    """Indices of the entries with a metric, best first; ties go to the earlier save."""
    sign = 1.0 if mode == "min" else -1.0
    scored = [i for i, e in enumerate(entries) if e.metric is not None]
    return sorted(scored, key=lambda i: sign * entries[i].metric)  # type: ignore[operator]


def save_rotating(
    directory: str | os.PathLike[str],
    obj: Any,
    *,
    tag: int,
    extra: Any = None,
    keep_last: int = 3,
    best_metric: float | None = None,
    keep_best: int = 1,
    mode: str = "min",
) -> Path:
    """Save ``obj`` as ``directory/ckpt-{tag:08d}.pt`` and delete checkpoints no longer kept.

    Kept: the ``keep_last`` most recently saved checkpoints, and the ``keep_best`` ones with the
    best ``best_metric`` (lowest for ``mode="min"``, highest for ``"max"``; ties keep the earlier).
    ``directory/index.json`` lists the kept checkpoints in save order with their metrics. The order
    of work is: write the checkpoint atomically (:func:`save`), then replace the index atomically,
    then delete the files the index dropped. So a failed save leaves the previous checkpoints and
    index untouched, and the index never names a file that is not complete. Saving a tag again
    replaces that checkpoint and makes it the latest. One process writes a directory at a time.

    Args:
        directory: created if missing.
        obj: the pytree to save, as for :func:`save`.
        tag: a non-negative int naming the checkpoint, usually the step or epoch.
        extra: JSON metadata, as for :func:`save`.
        keep_last: how many of the most recent checkpoints to keep (at least 1).
        best_metric: the metric ranking this checkpoint (a Python float, e.g.
            ``float(state.metrics["val_loss"])``), or ``None`` to leave it unranked.
        keep_best: how many of the best-ranked checkpoints to keep besides (0 or more).
        mode: ``"min"`` or ``"max"``; fixed for a directory by its first save.

    Returns:
        The path of the new checkpoint.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     for step, loss in enumerate([0.9, 0.2, 0.5, 0.4]):
        ...         _ = save_rotating(d, {"w": torch.ones(1) * step}, tag=step, best_metric=loss,
        ...                           keep_last=2)
        ...     sorted(p.name for p in Path(d).glob("ckpt-*.pt"))
        ...     latest_checkpoint(d).name, best_checkpoint(d).name
        ['ckpt-00000001.pt', 'ckpt-00000002.pt', 'ckpt-00000003.pt']
        ('ckpt-00000003.pt', 'ckpt-00000001.pt')
    """
    func = "save_rotating"
    root = ck._as_path(func, directory)
    tag = nonnegative_int(func, "tag", tag)
    keep_last = positive_int(func, "keep_last", keep_last)
    keep_best = nonnegative_int(func, "keep_best", keep_best)
    one_of(func, "mode", mode, ("min", "max"))
    if best_metric is not None:
        if type(best_metric) not in (int, float):
            fail(
                func,
                "best_metric",
                "must be a Python float or None",
                best_metric,
                "Convert a tensor with float(t).",
                exc=TypeError,
            )
        if math.isnan(best_metric):
            fail(
                func,
                "best_metric",
                "must not be NaN",
                best_metric,
                "Pass None to leave it unranked.",
            )
        best_metric = float(best_metric)

    root.mkdir(parents=True, exist_ok=True)
    stored_mode, entries = _read_index(func, root)
    if stored_mode is not None and stored_mode != mode:
        fail(
            func,
            "mode",
            f"must match the mode {stored_mode!r} of the directory's index",
            mode,
            "A directory ranks its checkpoints one way; use a new directory for the other.",
        )
    path = ck._save(func, obj, root / _file_name(tag), extra)

    entries = [e for e in entries if e.tag != tag] + [_Entry(tag, best_metric)]
    keep = set(range(max(0, len(entries) - keep_last), len(entries)))
    keep.update(_ranked(entries, mode)[:keep_best])
    _write_index(root, mode, [e for i, e in enumerate(entries) if i in keep])
    for i, e in enumerate(entries):
        if i not in keep:
            (root / _file_name(e.tag)).unlink(missing_ok=True)
    return path


def _lookup(
    func: str, directory: Any, pick: Callable[[str, list[_Entry]], _Entry | None]
) -> Path | None:
    root = ck._as_path(func, directory)
    mode, entries = _read_index(func, root)
    entry = pick(mode or "min", entries)
    if entry is None:
        return None
    path = root / _file_name(entry.tag)
    if not path.is_file():
        fail(
            func,
            "directory",
            f"must still hold the checkpoints its index lists; {path.name} is missing",
            str(root),
            "It was deleted by hand; delete index.json too, or restore the file.",
            exc=FileNotFoundError,
        )
    return path


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The most recently saved checkpoint of a :func:`save_rotating` directory, or ``None``.

    ``None`` when the directory or its index does not exist, or the index is empty.

    Args:
        directory: a directory written by :func:`save_rotating`.

    Returns:
        The checkpoint's path.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     print(latest_checkpoint(d))
        ...     _ = save_rotating(d, torch.zeros(1), tag=5)
        ...     latest_checkpoint(d).name
        None
        'ckpt-00000005.pt'
    """
    return _lookup("latest_checkpoint", directory, lambda mode, es: es[-1] if es else None)


def best_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The kept checkpoint of a :func:`save_rotating` directory with the best metric, or ``None``.

    Best is lowest for the directory's ``mode="min"``, highest for ``"max"``; ties go to the
    earlier save. ``None`` when no kept checkpoint has a metric.

    Args:
        directory: a directory written by :func:`save_rotating`.

    Returns:
        The checkpoint's path.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save_rotating(d, torch.zeros(1), tag=1, best_metric=0.8, mode="max")
        ...     _ = save_rotating(d, torch.zeros(1), tag=2, best_metric=0.6, mode="max")
        ...     best_checkpoint(d).name
        'ckpt-00000001.pt'
    """

    def pick(mode: str, entries: list[_Entry]) -> _Entry | None:
        ranked = _ranked(entries, mode)
        return entries[ranked[0]] if ranked else None

    return _lookup("best_checkpoint", directory, pick)
