"""A directory of rotating checkpoints: keep the latest few and the best few.

Built on :mod:`looplib._checkpoint`'s atomic writes; ``fit`` uses it for periodic checkpoints.

What is in a directory: ``ckpt-{tag:08d}.looplib.safetensors`` checkpoints, ``index.json`` (the
kept ones, in save order, with their metrics) and ``.looplib.lock`` (see :class:`DirectoryLock`).
Rotation only ever deletes or overwrites files it recognises as its own: a name of exactly that
form that is also a complete looplib checkpoint (a regular file, not a link), and temporary files
``.<one of those names>.looplib-<16 hex digits>.tmp``. Anything else in the directory is left
alone, whatever its name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from . import _checkpoint as ck
from . import _tensorfile as tf
from ._types import describe
from ._validate import fail, nonnegative_int, one_of, positive_int

try:
    import fcntl
except ImportError:  # Windows: no flock; DirectoryLock does not lock there
    fcntl = None  # type: ignore[assignment]

__all__ = ["DirectoryLock", "best_checkpoint", "latest_checkpoint", "save_rotating"]

_INDEX = "index.json"
_INDEX_FORMAT = "looplib.checkpoint-index"
_INDEX_VERSION = 2
_MAX_INDEX_BYTES = 64 << 20
_LOCK = ".looplib.lock"
_NAME = re.compile(r"ckpt-([0-9]{8,20})\.looplib\.safetensors")
_TEMP = re.compile(tf.TEMP_PATTERN)
_BAD_INDEX = (
    "It is not a valid checkpoint index ({detail}). Each checkpoint file is self-contained and "
    "loads with load(); delete index.json to start a fresh index."
)
_OLD_INDEX = (
    "version 1, written by an earlier looplib whose checkpoints (ckpt-*.pt) this looplib cannot "
    "read; start a new directory"
)
_BUSY = (
    "Two writers in one directory would delete each other's checkpoints. Wait for that run to "
    "end or use another directory; the lock is released when its process ends, however it ends."
)
_FOREIGN_FILE = (
    "{name} exists and is not a complete looplib checkpoint, so save_rotating leaves it alone. "
    "Move that file away, or use another tag or directory."
)
_UNRANKED = (
    "{name} is ranked by its metric {metric}, and a save without one would replace it and drop "
    "it from the ranking (the best checkpoint could be lost). Pass the metric of what you save, "
    "or save under another tag."
)


class _Entry(NamedTuple):
    tag: int
    metric: float | None


def _file_name(tag: int) -> str:
    return f"ckpt-{tag:08d}.looplib.safetensors"


def _tag_of(name: str) -> int | None:
    """The tag of a checkpoint file name rotation writes, exactly as it writes it; else None."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    tag = int(match.group(1))
    return tag if _file_name(tag) == name else None


def _is_regular(path: Path) -> bool:
    """A regular file itself, not a link to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a regular file holding a complete, intact looplib checkpoint."""
    if not _is_regular(path):
        return False
    try:
        with tf.Reader("save_rotating", path) as reader:
            reader.checkpoint_header()
    except (ValueError, OSError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# One writer per directory


_HELD: dict[tuple[int, int], DirectoryLock] = {}  # this process's locks, by the directory's inode
_HELD_GUARD = threading.RLock()  # re-entrant: __del__ may run inside it


def _identity(directory: Path) -> tuple[int, int]:
    st = os.stat(directory)
    return st.st_dev, st.st_ino


class DirectoryLock:
    """Hold a checkpoint directory for one writer, from construction until :meth:`release`.

    Takes an exclusive ``fcntl.flock`` on ``directory/.looplib.lock`` (creating the directory and
    the file if missing; the file is never deleted, and records the holder's process id). A
    second writer, in this process or another, gets a ``BlockingIOError`` naming the directory
    at once; nothing waits. The operating system releases the lock when the holding process ends,
    however it ends (even by SIGKILL), so a crashed run never leaves a directory locked.

    ``fit`` holds one for its whole run and :func:`save_rotating` one for each call, unless this
    process already holds the directory. Hold one yourself to own a directory for a loop of your
    own (or across several ``fit`` calls). On platforms without ``fcntl`` (Windows) it does not
    lock.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d, DirectoryLock(d):
        ...     _ = save_rotating(d, torch.zeros(1), tag=0)  # this process holds d
        ...     DirectoryLock(d)
        Traceback (most recent call last):
        BlockingIOError: DirectoryLock(directory=...): directory must not be in use by another writer...
    """

    _fd: int | None = None
    _key: tuple[int, int] | None = None

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._acquire("DirectoryLock", "directory", directory)

    @classmethod
    def _take(cls, func: str, arg: str, directory: Any) -> DirectoryLock:
        """A lock whose errors name ``func(arg=...)``, the caller's function and argument."""
        lock = cls.__new__(cls)
        lock._acquire(func, arg, directory)
        return lock

    def _acquire(self, func: str, arg: str, directory: Any) -> None:
        root = ck._as_path(func, directory, arg)
        self.directory = root
        if root.exists() and not root.is_dir():
            tf.fail_path(func, arg, "must be a directory", root, exc=NotADirectoryError)
        root.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(root / _LOCK, flags | getattr(os, "O_NONBLOCK", 0), 0o644)
        except OSError as e:
            fd = -1
            reason = e.strerror
        if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
            if fd >= 0:
                os.close(fd)
                reason = "not a regular file"
            tf.fail_path(
                func, arg, f"must allow its lock file {_LOCK} ({reason})", root, exc=OSError
            )
        key = _identity(root)
        with _HELD_GUARD:
            if key in _HELD:
                os.close(fd)
                tf.fail_path(
                    func,
                    arg,
                    "must not be in use by another writer; this process already holds it (a "
                    "DirectoryLock, or a fit run checkpointing into it)",
                    root,
                    _BUSY,
                    BlockingIOError,
                )
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = _holder(fd)
                    os.close(fd)
                    tf.fail_path(
                        func,
                        arg,
                        f"must not be in use by another writer; {holder} holds {_LOCK}",
                        root,
                        _BUSY,
                        BlockingIOError,
                    )
            _record_pid(fd)
            self._fd, self._key = fd, key
            _HELD[key] = self

    def release(self) -> None:
        """Let another writer take the directory. Releasing again does nothing."""
        with _HELD_GUARD:
            fd, self._fd = self._fd, None
            if self._key is not None and _HELD.get(self._key) is self:
                del _HELD[self._key]
            if fd is not None:
                os.close(fd)  # closing the file releases its flock

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _holder(fd: int) -> str:
    text = os.pread(fd, 32, 0)
    return f"process {int(text)}" if re.fullmatch(rb"[0-9]{1,10}\n", text) else "another process"


def _record_pid(fd: int) -> None:
    """Write this process's id into the lock file, unless it holds something else."""
    text = os.pread(fd, 32, 0)
    if text == b"" or re.fullmatch(rb"[0-9]{1,10}\n", text):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)


def _hold(func: str, arg: str, root: Path) -> DirectoryLock | None:
    """A new lock on ``root`` (errors naming ``func(arg=...)``), or None if this process holds it."""
    with _HELD_GUARD:
        if root.is_dir() and _identity(root) in _HELD:
            return None
    return DirectoryLock._take(func, arg, root)


@contextlib.contextmanager
def _writing(func: str, root: Path) -> Iterator[None]:
    """Hold ``root`` for one call, unless this process already holds it."""
    lock = _hold(func, "directory", root)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


# ---------------------------------------------------------------------------------------------
# The index


def _read_index(func: str, directory: Path) -> tuple[str | None, list[_Entry]]:
    """The index's mode and entries, oldest save first; ``(None, [])`` when there is none."""
    path = directory / _INDEX

    def bad(detail: str) -> NoReturn:
        tf.fail_path(
            func,
            "directory",
            "must hold a valid index.json",
            directory,
            _BAD_INDEX.format(detail=detail),
        )

    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None, []
    if not stat.S_ISREG(info.st_mode):
        bad("not a regular file")
    if info.st_size > _MAX_INDEX_BYTES:
        bad(f"{info.st_size} bytes, more than {_MAX_INDEX_BYTES}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError):
        bad("not JSON")
    if type(data) is dict and data.get("format") == _INDEX_FORMAT and data.get("version") == 1:
        bad(_OLD_INDEX)
    if (
        type(data) is not dict
        or data.get("format") != _INDEX_FORMAT
        or data.get("version") != _INDEX_VERSION
    ):
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
    if len({e.tag for e in entries}) != len(entries):
        bad("a tag listed twice")
    return mode, entries


def _write_index(directory: Path, mode: str, entries: list[_Entry]) -> None:
    rows = [{"file": _file_name(e.tag), "tag": e.tag, "metric": e.metric} for e in entries]
    data = {"format": _INDEX_FORMAT, "version": _INDEX_VERSION, "mode": mode, "checkpoints": rows}
    payload = (json.dumps(data, indent=1) + "\n").encode("utf-8")
    tf.atomic_write(directory / _INDEX, lambda f: tf._write_chunk(f, payload))


def _ranked(entries: list[_Entry], mode: str) -> list[int]:
    """Indices of the entries with a metric, best first; ties go to the earlier save."""
    sign = 1.0 if mode == "min" else -1.0
    scored = [i for i, e in enumerate(entries) if e.metric is not None]
    return sorted(scored, key=lambda i: sign * entries[i].metric)  # type: ignore[operator]


# ---------------------------------------------------------------------------------------------
# Leftovers of a crash


def _remove_temporaries(root: Path) -> None:
    """Delete temporary files of rotation's own atomic writes (an interrupted save's)."""
    for name in os.listdir(root):
        match = _TEMP.fullmatch(name)
        if match and (match["name"] == _INDEX or _tag_of(match["name"]) is not None):
            path = root / name
            if _is_regular(path):
                path.unlink(missing_ok=True)


def _remove_orphans(root: Path, listed: set[int]) -> None:
    """Delete checkpoints that a save wrote but did not get to list (it was killed first)."""
    for name in os.listdir(root):
        tag = _tag_of(name)
        if tag is not None and tag not in listed and _is_checkpoint(root / name):
            (root / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Saving and finding


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
    """Save ``obj`` as ``directory/ckpt-{tag:08d}.looplib.safetensors``; delete what is not kept.

    Kept: the ``keep_last`` most recently saved checkpoints, and the ``keep_best`` ones with the
    best ``best_metric`` (lowest for ``mode="min"``, highest for ``"max"``; ties keep the earlier).
    ``directory/index.json`` lists the kept checkpoints in save order with their metrics. The order
    of work is: write the checkpoint atomically (:func:`save`), then replace the index atomically,
    then delete the files the index dropped. So a failed save leaves the previous checkpoints and
    index untouched, and the index never names a file that is not complete. Saving a tag again
    replaces that checkpoint and makes it the latest; a save without a metric never replaces a
    ranked one (that raises), so the best checkpoint is never lost to an unranked save.

    One writer at a time: the call holds the directory's :class:`DirectoryLock` (unless this
    process already holds it, as ``fit`` does for its run), so a second live writer gets a
    ``BlockingIOError`` naming the directory. A save also clears what a killed save left behind:
    temporary files of rotation's own names, and complete checkpoints the index does not list.
    It never deletes or overwrites a file it did not write: a file under a checkpoint's name that
    is not a looplib checkpoint makes the save raise ``FileExistsError`` instead.

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
        ...     sorted(p.name for p in Path(d).glob("ckpt-*"))
        ...     latest_checkpoint(d).name, best_checkpoint(d).name
        ['ckpt-00000001.looplib.safetensors', 'ckpt-00000002.looplib.safetensors', 'ckpt-00000003.looplib.safetensors']
        ('ckpt-00000003.looplib.safetensors', 'ckpt-00000001.looplib.safetensors')
    """
    func = "save_rotating"
    root = ck._as_path(func, directory, "directory")
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

    if root.exists() and not root.is_dir():
        tf.fail_path(func, "directory", "must be a directory", root, exc=NotADirectoryError)
    root.mkdir(parents=True, exist_ok=True)
    with _writing(func, root):
        stored_mode, entries = _read_index(func, root)
        if stored_mode is not None and stored_mode != mode:
            fail(
                func,
                "mode",
                f"must match the mode {stored_mode!r} of the directory's index",
                mode,
                "A directory ranks its checkpoints one way; use a new directory for the other.",
            )
        name = _file_name(tag)
        old = next((e for e in entries if e.tag == tag), None)
        if old is not None and old.metric is not None and best_metric is None:
            fix = _UNRANKED.format(name=name, metric=old.metric)
            fail(func, "best_metric", f"must be a float when tag={tag} is ranked", None, fix)
        if old is None and os.path.lexists(root / name) and not _is_checkpoint(root / name):
            fix = _FOREIGN_FILE.format(name=name)
            fail(
                func, "tag", "must not name a file looplib did not write", tag, fix, FileExistsError
            )
        _remove_temporaries(root)
        path = ck._save(func, obj, root / name, extra)

        entries = [e for e in entries if e.tag != tag] + [_Entry(tag, best_metric)]
        keep = set(range(max(0, len(entries) - keep_last), len(entries)))
        keep.update(_ranked(entries, mode)[:keep_best])
        kept = [e for i, e in enumerate(entries) if i in keep]
        _write_index(root, mode, kept)
        for i, e in enumerate(entries):
            if i not in keep and _is_regular(root / _file_name(e.tag)):
                (root / _file_name(e.tag)).unlink(missing_ok=True)
        _remove_orphans(root, {e.tag for e in kept})
    return path


def _lookup(
    func: str, directory: Any, pick: Callable[[str, list[_Entry]], _Entry | None]
) -> Path | None:
    root = ck._as_path(func, directory, "directory")
    mode, entries = _read_index(func, root)
    entry = pick(mode or "min", entries)
    if entry is None:
        return None
    path = root / _file_name(entry.tag)
    if not path.is_file():
        tf.fail_path(
            func,
            "directory",
            f"must still hold the checkpoints its index lists; {path.name} is missing",
            root,
            "It was deleted by hand; delete index.json too, or restore the file.",
            FileNotFoundError,
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
        'ckpt-00000005.looplib.safetensors'
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
        'ckpt-00000001.looplib.safetensors'
    """

    def pick(mode: str, entries: list[_Entry]) -> _Entry | None:
        ranked = _ranked(entries, mode)
        return entries[ranked[0]] if ranked else None

    return _lookup("best_checkpoint", directory, pick)
