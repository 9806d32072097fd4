"""Rotation under attack: the best checkpoint survives unranked saves, a killed save's leftovers
are cleared (and nothing else), and one writer holds a directory at a time."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import looplib as ll
from looplib._rotate import DirectoryLock, best_checkpoint, latest_checkpoint, save_rotating

ROOT = Path(__file__).resolve().parent.parent
LOCK = ".looplib.lock"


def ckpt(tag: int) -> str:
    return f"ckpt-{tag:08d}.looplib.safetensors"


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if not p.is_symlink()}


# ---------------------------------------------------------------------------------------------
# (a) An unranked save never takes over or deletes the best checkpoint


def test_an_unranked_save_cannot_replace_the_best(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"keep_last": 1, "keep_best": 1}
    save_rotating(tmp_path, {"w": torch.tensor(0)}, tag=0, best_metric=0.5, **kwargs)
    save_rotating(tmp_path, {"w": torch.tensor(1)}, tag=1, best_metric=0.2, **kwargs)
    before = contents(tmp_path)
    message = (
        "save_rotating(best_metric=None): best_metric must be a float when tag=1 is ranked, got "
        "None. ckpt-00000001.looplib.safetensors is ranked by its metric 0.2"
    )
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        save_rotating(tmp_path, {"w": torch.tensor(-1)}, tag=1, **kwargs)
    assert contents(tmp_path) == before
    assert best_checkpoint(tmp_path) == tmp_path / ckpt(1)
    # Unranked saves under new tags rotate around the best and never drop it.
    for tag in (2, 3, 4):
        save_rotating(tmp_path, {"w": torch.tensor(tag)}, tag=tag, **kwargs)
    assert best_checkpoint(tmp_path) == tmp_path / ckpt(1)
    assert ll.load(tmp_path / ckpt(1))["w"].item() == 1
    rows = json.loads((tmp_path / "index.json").read_text())["checkpoints"]
    assert [(r["tag"], r["metric"]) for r in rows] == [(1, 0.2), (4, None)]


saves = st.lists(
    st.tuples(st.integers(0, 5), st.none() | st.floats(-10, 10, allow_nan=False)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None)
@given(saves=saves, keep_last=st.integers(1, 3), keep_best=st.integers(1, 2))
def test_the_index_never_loses_the_best(
    tmp_path_factory: pytest.TempPathFactory,
    saves: list[tuple[int, float | None]],
    keep_last: int,
    keep_best: int,
) -> None:
    directory = tmp_path_factory.mktemp("rotate")
    ranked: dict[int, float] = {}  # tag -> metric, of the kept ranked checkpoints
    for i, (tag, metric) in enumerate(saves):
        args = {"tag": tag, "best_metric": metric, "keep_last": keep_last, "keep_best": keep_best}
        if metric is None and tag in ranked:
            before = contents(directory)
            with pytest.raises(ValueError, match=r"must be a float when tag=\d+ is ranked"):
                save_rotating(directory, {"i": torch.tensor(i)}, **args)
            assert contents(directory) == before
            continue
        save_rotating(directory, {"i": torch.tensor(i)}, **args)
        if metric is None:
            ranked.pop(tag, None)
        else:
            ranked[tag] = metric
        best = best_checkpoint(directory)
        assert (best is None) == (not ranked)
        rows = json.loads((directory / "index.json").read_text())["checkpoints"]
        if best is not None:  # the best of all ranked saves still current is kept, and is best
            assert [r["metric"] for r in rows if r["file"] == best.name] == [min(ranked.values())]
        ranked = {r["tag"]: r["metric"] for r in rows if r["metric"] is not None}


# ---------------------------------------------------------------------------------------------
# (b) What a killed save leaves behind is cleared by the next save, and only that


def run_killed(directory: Path, stage: str) -> None:
    """Save into ``directory`` in a child process that SIGKILLs itself at ``stage``."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from looplib import _rotate, _tensorfile

        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        if {stage!r} == "before rename":  # the temporary file is written, fsynced, not renamed
            _tensorfile.os.replace = die
        else:  # the checkpoint is renamed into place, the index is not yet written
            _rotate._write_index = die
        _rotate.save_rotating({str(directory)!r}, {{"w": torch.ones(3)}}, tag=7, keep_last=1)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL


def user_files(directory: Path) -> dict[str, bytes]:
    """Files a user might keep in a checkpoint directory, named like rotation's own."""
    files = {
        "ckpt-00000007.pt": b"user",
        "ckpt-7.looplib.safetensors": b"user",
        "ckpt-00000007.looplib.safetensors.bak": b"user",
        ".ckpt-00000007.looplib.safetensors.tmp": b"user",
        ".ckpt-00000007.looplib.safetensors.looplib-0123456789ABCDEF.tmp": b"user",
        ".notes.txt.looplib-0123456789abcdef.tmp": b"user",
        "ckpt-00000009.looplib.safetensors": b"not a checkpoint",
        "mine.safetensors": ll.save({"x": torch.ones(1)}, directory / "m").read_bytes(),
    }
    (directory / "m").unlink()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


@pytest.mark.parametrize("stage", ["before rename", "before index"])
def test_a_killed_saves_leftovers_are_cleared_by_the_next_save(tmp_path: Path, stage: str) -> None:
    save_rotating(tmp_path, {"w": torch.zeros(3)}, tag=5, keep_last=1)
    mine = user_files(tmp_path)
    elsewhere = ll.save({"x": torch.ones(1)}, tmp_path.parent / f"{tmp_path.name}-target")
    os.symlink(elsewhere, tmp_path / ckpt(11))  # a link named like a checkpoint, to a real one
    run_killed(tmp_path, stage)
    temporary = re.compile(rf"\.{re.escape(ckpt(7))}\.looplib-[0-9a-f]{{16}}\.tmp")
    leftovers = [n for n in os.listdir(tmp_path) if temporary.fullmatch(n)]
    if stage == "before rename":
        assert len(leftovers) == 1 and not (tmp_path / ckpt(7)).exists()
    else:
        assert leftovers == [] and (tmp_path / ckpt(7)).exists()  # complete, but not listed
    assert latest_checkpoint(tmp_path) == tmp_path / ckpt(5)

    save_rotating(tmp_path, {"w": torch.full((3,), 8.0)}, tag=8, keep_last=1)
    expected = {LOCK, "index.json", ckpt(8), ckpt(11), *mine}
    assert set(os.listdir(tmp_path)) == expected  # 5 rotated out; the killed save's files gone
    assert {name: (tmp_path / name).read_bytes() for name in mine} == mine
    assert (tmp_path / ckpt(11)).is_symlink() and elsewhere.exists()


def test_a_file_that_is_not_a_checkpoint_is_never_overwritten(tmp_path: Path) -> None:
    save_rotating(tmp_path, [], tag=0)
    torch.save({"w": torch.ones(1)}, tmp_path / ckpt(9))  # the user's own, under our name
    theirs = (tmp_path / ckpt(9)).read_bytes()
    index = (tmp_path / "index.json").read_bytes()
    with pytest.raises(FileExistsError, match=r"save_rotating\(tag=9\): tag must not name a file"):
        save_rotating(tmp_path, [torch.ones(1)], tag=9)
    assert (tmp_path / ckpt(9)).read_bytes() == theirs
    assert (tmp_path / "index.json").read_bytes() == index
    # An unlisted file that is a complete looplib checkpoint (a killed save's) is replaced.
    ll.save([torch.zeros(1)], tmp_path / ckpt(10))
    save_rotating(tmp_path, [torch.ones(1)], tag=10)
    assert ll.load(latest_checkpoint(tmp_path))[0].item() == 1  # type: ignore[arg-type]


def test_the_index_and_the_lock_file_are_read_safely(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "index.json")  # reading this would block forever
    with pytest.raises(ValueError, match=r"not a valid checkpoint index \(not a regular file\)"):
        save_rotating(tmp_path, [], tag=0)
    with pytest.raises(ValueError, match=r"not a regular file"):
        latest_checkpoint(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / LOCK).write_text("the user's notes\n")
    save_rotating(other, [], tag=0)
    assert (other / LOCK).read_text() == "the user's notes\n"  # used for locking, not rewritten


# ---------------------------------------------------------------------------------------------
# (c) One writer per directory


def hold_in_child(directory: Path) -> subprocess.Popen[str]:
    """A child process that holds ``directory``'s lock until it is killed."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from looplib._rotate import DirectoryLock

        lock = DirectoryLock({str(directory)!r})
        print("held", flush=True)
        time.sleep(600)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "held\n"
    return child


def test_a_second_live_writer_gets_a_clear_error(tmp_path: Path) -> None:
    child = hold_in_child(tmp_path)
    try:
        d = repr(str(tmp_path))
        busy = f"(directory={d}): directory must not be in use by another writer; process "
        busy = re.escape(busy + str(child.pid))
        with pytest.raises(BlockingIOError, match=rf"save_rotating{busy}"):
            save_rotating(tmp_path, [], tag=0)
        with pytest.raises(BlockingIOError, match=rf"DirectoryLock{busy}"):
            DirectoryLock(tmp_path)
        model = torch.nn.Linear(1, 1)
        step = ll.train_step(model, lambda m, b: m(b).pow(2).mean(), ll.optim.sgd(0.1))
        with pytest.raises(BlockingIOError, match=re.escape(f"fit(checkpoints={d}): checkpoints")):
            ll.fit(step, ll.init(model, ll.optim.sgd(0.1)), [torch.ones(2, 1)], progress=False,
                   checkpoints=ll.Checkpoints(tmp_path))  # fmt: skip
        assert sorted(os.listdir(tmp_path)) == [LOCK]  # nothing written
    finally:
        child.kill()  # SIGKILL: the operating system releases its lock
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]
    save_rotating(tmp_path, [], tag=0)
    assert latest_checkpoint(tmp_path) == tmp_path / ckpt(0)


def test_a_lock_held_in_this_process(tmp_path: Path) -> None:
    with DirectoryLock(tmp_path) as lock:
        with pytest.raises(BlockingIOError, match=r"this process already holds it"):
            DirectoryLock(tmp_path)
        model = torch.nn.Linear(1, 1)
        step = ll.train_step(model, lambda m, b: m(b).pow(2).mean(), ll.optim.sgd(0.1))
        result = ll.fit(step, ll.init(model, ll.optim.sgd(0.1)), [torch.ones(2, 1)],
                        max_epochs=2, progress=False, checkpoints=ll.Checkpoints(tmp_path))  # fmt: skip
        assert len(result.history) == 2
        save_rotating(tmp_path, [], tag=100)  # this process holds it: no conflict
        assert (tmp_path / LOCK).read_text() == f"{os.getpid()}\n"
    lock.release()  # again: nothing happens
    with DirectoryLock(tmp_path):  # released on exit, so it can be taken again
        pass
    assert (tmp_path / LOCK).exists()  # the lock file stays (deleting it would race)


def test_fit_releases_its_lock_however_it_ends(tmp_path: Path) -> None:
    model = torch.nn.Linear(1, 1)

    def loss(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if float(batch.sum()) < 0:
            raise RuntimeError("bad batch")
        return m(batch).pow(2).mean()

    step = ll.train_step(model, loss, ll.optim.sgd(0.1))
    state = ll.init(model, ll.optim.sgd(0.1))
    with pytest.raises(RuntimeError, match="bad batch"):
        ll.fit(
            step, state, [-torch.ones(2, 1)], progress=False, checkpoints=ll.Checkpoints(tmp_path)
        )
    ll.fit(
        step,
        state,
        [torch.ones(2, 1)],
        max_epochs=1,
        progress=False,
        checkpoints=ll.Checkpoints(tmp_path),
    )
    DirectoryLock(tmp_path).release()
