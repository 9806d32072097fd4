"""Checkpoints: bit-exact round trips, atomic writes, clear errors, no code run on load, rotation."""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import math
import os
import pickle
import re
import signal
import stat
import struct
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import optree
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

import looplib as ll
from looplib import _checkpoint, _rotate, _tensorfile
from looplib._checkpoint import load, load_with_extra, register_checkpoint_type, save
from looplib._rotate import best_checkpoint, latest_checkpoint, save_rotating
from looplib._types import TrainState

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@register_checkpoint_type
class Moments(NamedTuple):
    mu: Any
    nu: Any


@register_checkpoint_type
class OptState(NamedTuple):
    steps: torch.Tensor
    moments: Moments


class Unregistered(NamedTuple):
    x: Any


# ---------------------------------------------------------------------------------------------
# Helpers


def assert_identical(a: Any, b: Any, where: str = "obj") -> None:
    """Same node types, dict key order, scalar values and tensor dtype, shape and bytes."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        bytes_a = a.contiguous().reshape(-1).view(torch.uint8)
        bytes_b = b.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(bytes_a, bytes_b), where
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or struct.pack("<d", a) == struct.pack("<d", b)
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_round_trip(obj: Any, path: Path) -> Any:
    out = load(save(obj, path))
    assert_identical(obj, out)
    assert optree.tree_structure(out) == optree.tree_structure(obj)
    return out


def temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


MARKER = b'{"__metadata__":{"format":"looplib.checkpoint","sha256":"'
DIGEST_AT = 8 + len(MARKER)  # the 64 hex digits of the digest start here
SIZE_AT = DIGEST_AT + 64 + len('","size":"')  # then the file's size, 20 decimal digits


def read_format(path: Path) -> tuple[dict[str, Any], bytes]:
    """Parse a checkpoint by the format documented in looplib._checkpoint and _tensorfile.

    Returns ``({"metadata": ..., "tensors": ...}, data)``, with the metadata's tree and extra
    parsed from their JSON text and ``tensors`` the safetensors header's entries.
    """
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert raw[8:DIGEST_AT] == MARKER and (8 + header_len) % 8 == 0
    header = json.loads(raw[8 : 8 + header_len])
    metadata = header.pop("__metadata__")
    assert list(metadata)[:3] == ["format", "sha256", "size"]
    assert metadata["size"] == f"{len(raw):020d}" and raw[SIZE_AT : SIZE_AT + 20].isdigit()
    zeroed = raw[:DIGEST_AT] + b"0" * 64 + raw[DIGEST_AT + 64 :]
    assert hashlib.sha256(zeroed).hexdigest() == metadata["sha256"]
    metadata["tree"] = json.loads(metadata["tree"])
    metadata["extra"] = json.loads(metadata["extra"])
    return {"metadata": metadata, "tensors": header}, raw[8 + header_len :]


class Text(str):
    """Metadata text written as it is (write_format writes a tree or extra as JSON text)."""


def write_format(path: Path, header: dict[str, Any], data: bytes) -> None:
    """Write a file in the documented format with a valid size and digest (as an attacker could).

    ``header`` is as ``read_format`` returns it; its tree and extra are written as JSON text
    (unless given as ``Text``), every other metadata value as given (so a test can put a non-str
    there). A "format" other than looplib's goes in the marker; with the marker intact, pass it
    as ``"format "`` to write a second "format" key after the fixed fields.
    """
    metadata = dict(header["metadata"])
    for key in ("tree", "extra"):
        if key in metadata and not isinstance(metadata[key], Text):
            metadata[key] = json.dumps(metadata[key])
    marker = metadata.get("format", "looplib.checkpoint")
    rest = [(k.strip(), v) for k, v in metadata.items() if k not in ("format", "sha256", "size")]

    def build(size: int) -> bytes:
        text = '{"__metadata__":{"format":' + json.dumps(marker)
        text += ',"sha256":"' + "0" * 64 + f'","size":"{size:020d}"'
        text += "".join(f",{json.dumps(k)}:{json.dumps(v)}" for k, v in rest) + "}"
        tensors = header["tensors"]
        if isinstance(tensors, Text):  # the entries' JSON as it is, for speed
            text += "," + tensors if tensors else ""
        else:
            text += "".join(f",{json.dumps(k)}:{json.dumps(v)}" for k, v in tensors.items())
        return (text + "}").encode()

    head = build(0)
    body = struct.pack("<Q", len(head)) + build(8 + len(head) + len(data)) + data
    digest = hashlib.sha256(body).hexdigest().encode()
    path.write_bytes(body[:DIGEST_AT] + digest + body[DIGEST_AT + 64 :])


def rewrite_header(path: Path, change: Any) -> None:
    header, data = read_format(path)
    change(header)
    write_format(path, header, data)


def fail_midway(monkeypatch: pytest.MonkeyPatch, after: int, exc: BaseException) -> None:
    """Make the writer write half of chunk number ``after`` and then raise ``exc``."""
    calls = []
    real = _tensorfile._write_chunk

    def write(f: Any, chunk: Any) -> None:
        calls.append(1)
        if len(calls) == after:
            real(f, memoryview(chunk)[: len(chunk) // 2])
            raise exc
        real(f, chunk)

    monkeypatch.setattr(_tensorfile, "_write_chunk", write)


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def train_state() -> TrainState:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g)
    return TrainState(
        params={"0.weight": w, "0.bias": torch.randn(4, generator=g).to(torch.bfloat16)},
        buffers={"bn.num_batches_tracked": torch.tensor(7), "bn.mean": torch.zeros(4).half()},
        opt_state=OptState(
            steps=torch.tensor(3, dtype=torch.int64),
            moments=Moments(mu={"0.weight": w * 0.1}, nu=(torch.full((2,), math.nan), None)),
        ),
        step=torch.tensor(12, dtype=torch.int64),
        metrics={"loss": torch.tensor(0.25), "correct": torch.tensor([True, False])},
        slots={
            "rng": torch.get_rng_state(),
            "accumulate": Moments(mu=torch.tensor(2), nu=[]),
            "misc": [1, -2.5, True, "text", None, (), {}, OrderedDict(b=1, a=2)],
            "odd": {
                "z": torch.tensor([1 + 2j], dtype=torch.complex64),
                "empty": torch.empty(0, 3, dtype=torch.int32),
                "u8": torch.arange(250, 256, dtype=torch.uint8),
                "inf": torch.tensor([math.inf, -math.inf, -0.0], dtype=torch.float64),
            },
        },
    )


# ---------------------------------------------------------------------------------------------
# Round trips


def test_train_state_round_trips_bit_exactly(tmp_path: Path) -> None:
    state = train_state()
    out = assert_round_trip(state, tmp_path / "state.pt")
    assert isinstance(out, TrainState)
    assert isinstance(out.opt_state.moments, Moments)
    assert type(out.slots["misc"][-1]) is OrderedDict
    assert out.slots["rng"].dtype == torch.uint8
    torch.set_rng_state(out.slots["rng"])  # a loaded RNG state is usable as one


def test_extra_round_trips(tmp_path: Path) -> None:
    extra = {"epoch": 3, "history": [{"loss": 0.5}, {"loss": math.nan}], "pos": [1, 2], "ok": None}
    obj, got = load_with_extra(save({"w": torch.ones(1)}, tmp_path / "c.pt", extra=extra))
    assert_identical(extra, got)
    assert_identical({"w": torch.ones(1)}, obj)
    assert load_with_extra(save([], tmp_path / "d.pt")) == ([], None)


def test_tensors_are_stored_plain_contiguous_and_detached(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    z = torch.tensor([1 + 2j, 3 - 4j])
    tree = {
        "slice": base[1:3, 2:5],
        "transposed": base.t(),
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "param": torch.nn.Parameter(torch.ones(2)),
        "conj": z.conj(),
        "neg": torch._neg_view(torch.tensor([1.0, -2.0])),
        "scalar": torch.tensor(5, dtype=torch.int16),
    }
    out = load(save(tree, tmp_path / "c.pt"))
    for k, t in tree.items():
        assert type(out[k]) is torch.Tensor and out[k].is_contiguous(), k
        assert not out[k].requires_grad and not out[k].is_conj() and not out[k].is_neg(), k
        assert out[k].dtype == t.dtype and torch.equal(out[k], t.detach()), k
    data = read_format(tmp_path / "c.pt")[1]
    assert len(data) == sum(t.numel() * t.element_size() for t in tree.values())


def test_save_does_not_change_its_input(tmp_path: Path) -> None:
    state = train_state()
    before = optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)  # type: ignore[arg-type]
    save(state, tmp_path / "c.pt")
    assert_identical(before, state)


def test_map_location(tmp_path: Path) -> None:
    path = save({"w": torch.ones(2, 3)}, tmp_path / "c.pt")
    out = load(path, map_location=torch.device("meta"))
    assert out["w"].device.type == "meta" and out["w"].shape == (2, 3)
    with pytest.raises(ValueError, match=r"load\(map_location='nowhere'\): map_location must name"):
        load(path, map_location="nowhere")
    with pytest.raises(TypeError, match=r"map_location must be a str or torch.device"):
        load(path, map_location=0)  # type: ignore[arg-type]


DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


@st.composite
def tensors(draw: Any) -> torch.Tensor:
    """Small tensors of any bit pattern (NaN payloads included)."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    n = math.prod(shape) * dtype.itemsize
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(draw(st.binary(min_size=n, max_size=n))), dtype=torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape).clone()


leaves = tensors() | st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
trees = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4), children, max_size=3)
        | st.tuples(children, children).map(lambda p: Moments(*p))
    ),
    max_leaves=12,
)


@SETTINGS
@given(tree=trees)
def test_random_trees_round_trip_bit_exactly(tmp_path: Path, tree: Any) -> None:
    assert_round_trip(tree, tmp_path / "c.pt")
    assert temp_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# What save refuses, before writing anything


@pytest.mark.parametrize(
    ("obj", "exc", "message"),
    [
        (
            TrainState({}, {}, None, torch.tensor(0), {}, {"x": [0, 1, 2, {3: torch.ones(1)}]}),
            TypeError,
            "save(obj): obj.slots['x'][3] must have str keys, got key 3 of type int.",
        ),
        (
            {"a": Unregistered(1)},
            TypeError,
            "save(obj): obj['a'] must be a registered NamedTuple",
        ),
        ({"a": {1, 2}}, TypeError, "save(obj): obj['a'] must be a tensor, None, bool"),
        ([b"bytes"], TypeError, "save(obj): obj[0] must be a tensor"),
        (
            {"s": torch.eye(2).to_sparse()},
            TypeError,
            "save(obj): obj['s'] must be a dense tensor",
        ),
        ({"m": torch.empty(2, device="meta")}, TypeError, "save(obj): obj['m'] must hold data"),
    ],
)
def test_save_rejects_what_it_cannot_store(
    tmp_path: Path, obj: Any, exc: type[Exception], message: str
) -> None:
    with pytest.raises(exc, match=re.escape(message)):
        save(obj, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_cycles_and_bad_extra(tmp_path: Path) -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match=re.escape("save(obj): obj[0] contains itself")):
        save(loop, tmp_path / "c.pt")
    with pytest.raises(TypeError, match=re.escape("save(extra): extra['pos'] must be JSON data")):
        save([], tmp_path / "c.pt", extra={"pos": (1, 2)})
    with pytest.raises(TypeError, match=re.escape("save(extra): extra must have str keys")):
        save([], tmp_path / "c.pt", extra={1: 2})
    with pytest.raises(TypeError, match=re.escape("extra['t'] must be JSON data")):
        save([], tmp_path / "c.pt", extra={"t": torch.ones(1)})
    assert list(tmp_path.iterdir()) == []


def test_save_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"save\(path='.*'\): path must be in an existing"):
        save([], tmp_path / "missing" / "c.pt")
    with pytest.raises(IsADirectoryError, match=r"path must name a file"):
        save([], tmp_path)
    with pytest.raises(TypeError, match=r"save\(path=3\): path must be a str or os.PathLike"):
        save([], 3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Atomic, durable writes


@pytest.mark.parametrize("exc", [disk_full(), RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("after", [1, 2, 3, 4])  # length and header, 2 tensors, digest
def test_failed_save_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException, after: int
) -> None:
    path = tmp_path / "c.pt"
    old = {"w": torch.arange(4.0), "b": torch.zeros(2)}
    save(old, path)
    fail_midway(monkeypatch, after, exc)
    with pytest.raises(type(exc)):
        save({"w": torch.ones(4), "b": torch.ones(2)}, path)
    monkeypatch.undo()
    assert_identical(old, load(path))
    assert temp_files(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_failed_fsync_or_rename_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    path = save([torch.zeros(2)], tmp_path / "c.pt")

    def broken(*args: Any) -> None:
        raise disk_full()

    monkeypatch.setattr(os, step, broken)
    with pytest.raises(OSError, match="No space left"):
        save([torch.ones(2)], path)
    monkeypatch.undo()
    assert_identical(load(path), [torch.zeros(2)])
    assert names(tmp_path) == ["c.pt"]


def test_failed_first_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_midway(monkeypatch, 2, disk_full())
    with pytest.raises(OSError, match="No space left"):
        save({"w": torch.ones(4)}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="directories are fsynced on POSIX only")
def test_save_fsyncs_the_file_then_renames_then_fsyncs_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("replace")
        assert Path(src).parent == Path(dst).parent == tmp_path
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save([torch.ones(1)], tmp_path / "c.pt")
    assert events == ["fsync file", "replace", "fsync dir"]


# ---------------------------------------------------------------------------------------------
# Damaged and foreign files


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "c.pt"
    return save(train_state(), path, extra={"epoch": 1}).read_bytes()


def test_missing_file_message(tmp_path: Path) -> None:
    p = str(tmp_path / "x.pt")
    message = f"load(path={p!r}): path must name an existing checkpoint file, got {p!r}."
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        load(p)
    with pytest.raises(IsADirectoryError, match=r"latest_checkpoint\(directory\)"):
        load(tmp_path)


@SETTINGS
@given(data=st.data())
def test_truncation_anywhere_is_reported(tmp_path: Path, good_bytes: bytes, data: Any) -> None:
    cut = data.draw(st.integers(0, len(good_bytes) - 1))
    path = tmp_path / "cut.pt"
    path.write_bytes(good_bytes[:cut])
    with pytest.raises(ValueError, match=r"path must be a complete looplib checkpoint") as info:
        load(path)
    assert ("empty" if cut == 0 else "truncated") in str(info.value)


@SETTINGS
@given(data=st.data())
def test_a_flipped_byte_anywhere_is_reported(tmp_path: Path, good_bytes: bytes, data: Any) -> None:
    offset = data.draw(st.integers(0, len(good_bytes) - 1))
    mask = data.draw(st.integers(1, 255))
    damaged = bytearray(good_bytes)
    damaged[offset] ^= mask
    path = tmp_path / "flip.pt"
    path.write_bytes(damaged)
    with pytest.raises(ValueError, match=r"looplib") as info:
        load(path)
    message = str(info.value)
    corrupted = "corrupted: its SHA-256 digest does not match"
    if 8 <= offset < DIGEST_AT:
        assert "does not start with the looplib checkpoint marker" in message
    elif SIZE_AT <= offset < SIZE_AT + 20:  # the size: a digit still, or not
        assert "truncated" in message or "damaged" in message or corrupted in message
    else:  # the header's length, the digest, the rest of the header and the data
        assert corrupted in message


def test_appended_bytes_are_reported(tmp_path: Path, good_bytes: bytes) -> None:
    path = tmp_path / "long.pt"
    path.write_bytes(good_bytes + b"\0")
    with pytest.raises(ValueError, match=r"path must be an intact looplib checkpoint.*damaged"):
        load(path)


def test_foreign_files_are_reported(tmp_path: Path) -> None:
    torch_file = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), torch_file)
    with pytest.raises(
        ValueError, match=r"must be a checkpoint written by looplib.save.*torch.load"
    ):
        load(torch_file)
    text = tmp_path / "notes.txt"
    text.write_text("hello, world\n" * 10)
    with pytest.raises(ValueError, match=r"does not start with the looplib checkpoint marker"):
        load(text)
    pickled = tmp_path / "obj.pkl"
    pickled.write_bytes(pickle.dumps({"w": [1.0]}))
    with pytest.raises(ValueError, match=r"looks like a pickle, which load\(\) never reads"):
        load(pickled)


class Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> Any:
        return (open, (self.marker, "w"))


def test_load_never_unpickles(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(Payload(canary))).close()
    assert canary.exists()  # the payload is live: unpickling it runs code

    marker = tmp_path / "marker"
    as_pickle, as_torch_file = tmp_path / "evil.pkl", tmp_path / "evil.pt"
    as_pickle.write_bytes(pickle.dumps({"state": Payload(marker)}))
    torch.save({"state": Payload(marker)}, as_torch_file)
    for path in (as_pickle, as_torch_file):
        with pytest.raises(ValueError, match=r"must be a checkpoint written by looplib.save"):
            load(path)
        with pytest.raises(ValueError, match=r"must be a checkpoint written by looplib.save"):
            load_with_extra(path)
    assert not marker.exists()


def test_a_well_formed_file_cannot_name_code(tmp_path: Path) -> None:
    """A file with a valid digest naming a callable still builds only registered NamedTuples."""
    path = tmp_path / "crafted.pt"
    for name in ("builtins.open", "os.system", "looplib._checkpoint.save"):
        tree = {"namedtuple": name, "fields": ["a"], "values": [str(tmp_path / "marker")]}
        metadata = {"format": "looplib.checkpoint", "version": "2", "tree": tree, "extra": None}
        write_format(path, {"metadata": metadata, "tensors": {}}, b"")
        with pytest.raises(ValueError, match=rf"no class is registered under that name.*{name}"):
            load(path)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m, t: m.update(version="3"), r"path must have format version <= 2.*upgrade"),
        (lambda m, t: m.update(format="other"), r"does not start with the looplib checkpoint"),
        (lambda m, t: m.update(version="1"), r"header is malformed \(version '1'\)"),
        (lambda m, t: m.update(version="02"), r"header is malformed \(version '02'\)"),
        (lambda m, t: m.update(version=2), r"malformed \(a __metadata__ value that is not a str"),
        (lambda m, t: t["w"].update(dtype="object"), r"malformed \(tensor 'w': dtype 'object'"),
        (lambda m, t: t["w"].update(shape=[1]), r"shape \[1\] needs 4 bytes, its offsets give 12"),
        (lambda m, t: m.update(tree={"tensor": 99}), r"malformed \(tensor name 99 at obj\)"),
        (lambda m, t: m.update(tree={"set": []}), r"malformed \(node \{'set': \[\]\} at obj\)"),
        (lambda m, t: m.update(tree=[1]), r"malformed \(node \[1\] at obj\)"),
        (lambda m, t: m.pop("extra"), r"malformed \(metadata keys \['format', 'sha256'"),
        (lambda m, t: m.update(more="x"), r"malformed \(metadata keys"),
    ],
)
def test_well_formed_but_wrong_headers(tmp_path: Path, change: Any, message: str) -> None:
    path = save({"w": torch.ones(3)}, tmp_path / "c.pt")
    rewrite_header(path, lambda h: change(h["metadata"], h["tensors"]))
    with pytest.raises(ValueError, match=message):
        load(path)


def test_unknown_and_changed_namedtuple_types(tmp_path: Path) -> None:
    path = save(train_state(), tmp_path / "c.pt")

    def rename(header: dict[str, Any]) -> None:
        header["metadata"]["tree"]["values"][2]["namedtuple"] = "mypkg.state.GoneState"

    rewrite_header(path, rename)
    with pytest.raises(
        ValueError, match=r"path must hold only registered NamedTuple types"
    ) as info:
        load(path)
    assert "'mypkg.state.GoneState' at obj.opt_state" in str(info.value)
    assert "register_checkpoint_type(cls)" in str(info.value)

    path = save(train_state(), tmp_path / "d.pt")
    rewrite_header(
        path, lambda h: h["metadata"]["tree"].update(fields=["a", "b", "c", "d", "e", "f"])
    )
    with pytest.raises(ValueError, match=r"with fields \['a'.*but the registered class has fields"):
        load(path)


def test_registration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(_checkpoint, "_TYPES", dict(_checkpoint._TYPES))
    monkeypatch.setattr(_checkpoint, "_NAMES", dict(_checkpoint._NAMES))
    with pytest.raises(TypeError, match=r"register_checkpoint_type\(cls=.*must be a NamedTuple"):
        register_checkpoint_type(dict)

    def point_class(fields: list[str]) -> Any:
        return collections.namedtuple("Point", fields)

    Point = point_class(["x", "y"])
    assert register_checkpoint_type(Point, name="tests.Point") is Point
    out = load(save(Point(torch.ones(1), 2), tmp_path / "c.pt"))
    assert (
        type(out) is Point
        and read_format(tmp_path / "c.pt")[0]["metadata"]["tree"]["namedtuple"] == "tests.Point"
    )

    Again = point_class(["x", "y"])  # a re-imported module's copy
    register_checkpoint_type(Again, name="tests.Point")
    assert type(load(tmp_path / "c.pt")) is Again
    Other = point_class(["x", "z"])
    with pytest.raises(ValueError, match=r"must not take the name 'tests.Point'"):
        register_checkpoint_type(Other, name="tests.Point")
    assert _checkpoint._TYPES["looplib.TrainState"] is TrainState


# ---------------------------------------------------------------------------------------------
# Rotating checkpoints


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def ckpt(tag: int) -> str:
    return f"ckpt-{tag:08d}.looplib.safetensors"


LOCK = ".looplib.lock"  # DirectoryLock's file, made by the first save into a directory


def test_keep_last(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "none") is None and best_checkpoint(tmp_path) is None
    for tag in range(5):
        path = save_rotating(tmp_path, {"w": torch.tensor(tag)}, tag=tag, keep_last=2)
        assert path == tmp_path / ckpt(tag)
    assert names(tmp_path) == [LOCK, ckpt(3), ckpt(4), "index.json"]
    assert latest_checkpoint(tmp_path) == tmp_path / ckpt(4)
    assert load(latest_checkpoint(tmp_path))["w"].item() == 4  # type: ignore[arg-type]
    assert best_checkpoint(tmp_path) is None


@pytest.mark.parametrize(
    ("mode", "keep_best", "kept", "best"),
    [
        ("min", 1, [1, 4, 5], 1),
        ("max", 1, [2, 4, 5], 2),
        ("min", 2, [1, 3, 4, 5], 1),
        ("min", 0, [4, 5], 5),
    ],
)
def test_keep_best(tmp_path: Path, mode: str, keep_best: int, kept: list[int], best: int) -> None:
    metrics = [0.5, 0.1, 0.9, 0.3, None, 0.7]
    for tag, metric in enumerate(metrics):
        save_rotating(
            tmp_path,
            [torch.ones(1)],
            tag=tag,
            best_metric=metric,
            keep_last=2,
            keep_best=keep_best,
            mode=mode,
        )
    assert names(tmp_path) == [LOCK, *map(ckpt, kept), "index.json"]
    index = json.loads((tmp_path / "index.json").read_text())
    assert [row["tag"] for row in index["checkpoints"]] == kept
    assert [row["metric"] for row in index["checkpoints"]] == [metrics[t] for t in kept]
    assert best_checkpoint(tmp_path) == tmp_path / ckpt(best)
    assert latest_checkpoint(tmp_path) == tmp_path / ckpt(5)


def test_ties_keep_the_earlier_and_extra_is_stored(tmp_path: Path) -> None:
    for tag in range(3):
        save_rotating(tmp_path, [], tag=tag, best_metric=1.0, keep_last=1, extra={"epoch": tag})
    assert names(tmp_path) == [LOCK, ckpt(0), ckpt(2), "index.json"]
    assert best_checkpoint(tmp_path) == tmp_path / ckpt(0)
    assert load_with_extra(latest_checkpoint(tmp_path))[1] == {"epoch": 2}  # type: ignore[arg-type]


def test_saving_a_tag_again_replaces_it_and_makes_it_latest(tmp_path: Path) -> None:
    for tag in (10, 20, 30):
        save_rotating(tmp_path, {"t": torch.tensor(tag)}, tag=tag)
    save_rotating(tmp_path, {"t": torch.tensor(-1)}, tag=20)
    assert latest_checkpoint(tmp_path) == tmp_path / ckpt(20)
    assert load(tmp_path / ckpt(20))["t"].item() == -1
    assert names(tmp_path) == [LOCK, ckpt(10), ckpt(20), ckpt(30), "index.json"]


@pytest.mark.parametrize("after", [1, 3])
def test_a_failed_save_leaves_the_directory_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    for tag in range(3):
        save_rotating(
            tmp_path, {"w": torch.tensor(tag)}, tag=tag, best_metric=float(tag), keep_last=2
        )
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    fail_midway(monkeypatch, after, disk_full())
    with pytest.raises(OSError):
        save_rotating(tmp_path, {"w": torch.tensor(3)}, tag=3, best_metric=-1.0, keep_last=2)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert latest_checkpoint(tmp_path) == tmp_path / ckpt(2)
    assert best_checkpoint(tmp_path) == tmp_path / ckpt(0)


def test_the_index_changes_only_after_the_checkpoint_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_rotating(tmp_path, [torch.zeros(1)], tag=0, keep_last=1)
    index = (tmp_path / "index.json").read_bytes()

    def broken_index(*args: Any) -> None:
        assert load(tmp_path / ckpt(1)) == [1]  # the new checkpoint is complete by now
        raise disk_full()

    monkeypatch.setattr(_rotate, "_write_index", broken_index)
    with pytest.raises(OSError):
        save_rotating(tmp_path, [1], tag=1, keep_last=1)
    monkeypatch.undo()
    assert (tmp_path / "index.json").read_bytes() == index
    assert latest_checkpoint(tmp_path) == tmp_path / ckpt(0)
    assert_identical(load(tmp_path / ckpt(0)), [torch.zeros(1)])
    # The new file is complete but unlisted; the next save clears it (see the crash tests).
    assert names(tmp_path) == [LOCK, ckpt(0), ckpt(1), "index.json"]


def test_rotation_argument_errors(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"tag": -1}, ValueError, "save_rotating(tag=-1): tag must be a non-negative int, got -1."),
        ({"tag": 0, "keep_last": 0}, ValueError, "keep_last must be a positive int, got 0."),
        ({"tag": 0, "keep_best": -1}, ValueError, "keep_best must be a non-negative int"),
        ({"tag": 0, "mode": "auto"}, ValueError, "mode must be one of ['min', 'max'], got 'auto'."),
        (
            {"tag": 0, "best_metric": torch.tensor(1.0)},
            TypeError,
            "Convert a tensor with float(t).",
        ),
        ({"tag": 0, "best_metric": math.nan}, ValueError, "best_metric must not be NaN"),
    ]
    for kwargs, exc, message in cases:
        with pytest.raises(exc, match=re.escape(message)):
            save_rotating(tmp_path, [], **kwargs)
    save_rotating(tmp_path, [], tag=0, mode="max")
    with pytest.raises(ValueError, match=re.escape("mode must match the mode 'max'")):
        save_rotating(tmp_path, [], tag=1)
    assert names(tmp_path) == [LOCK, ckpt(0), "index.json"]


def test_a_bad_index_raises_and_deletes_nothing(tmp_path: Path) -> None:
    save_rotating(tmp_path, [], tag=0)
    victim = tmp_path.parent / "victim.txt"
    victim.write_text("keep me")
    index = json.loads((tmp_path / "index.json").read_text())
    index["checkpoints"] = [{"file": "../victim.txt", "tag": 0, "metric": None}]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"must hold a valid index.json.*delete index.json"):
        save_rotating(tmp_path, [], tag=1, keep_last=1)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"not a valid checkpoint index \(not JSON\)"):
        latest_checkpoint(tmp_path)
    assert victim.read_text() == "keep me" and names(tmp_path) == [LOCK, ckpt(0), "index.json"]


def test_a_listed_file_deleted_by_hand_is_reported(tmp_path: Path) -> None:
    save_rotating(tmp_path, [], tag=0)
    (tmp_path / ckpt(0)).unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt-00000000.looplib.safetensors is missing"):
        latest_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------
# The safetensors layout: readable by safetensors itself


def test_safetensors_reads_a_checkpoint_under_readable_names(tmp_path: Path) -> None:
    state = train_state()
    path = save(state, tmp_path / "c.safetensors")
    tensors = load_file(path)
    assert tensors["params.0.weight"].equal(state.params["0.weight"])
    assert tensors["params.0.bias"].dtype == torch.bfloat16
    assert tensors["opt_state.moments.mu.0.weight"].equal(state.opt_state.moments.mu["0.weight"])
    assert tensors["opt_state.moments.nu.0"].isnan().all()
    assert tensors["slots.accumulate.mu"].equal(torch.tensor(2))
    assert tensors["slots.rng"].equal(state.slots["rng"])
    assert tensors["metrics.correct"].dtype == torch.bool
    # Complex tensors are stored as torch.view_as_real, which every safetensors reader knows.
    assert tensors["slots.odd.z"].equal(torch.view_as_real(state.slots["odd"]["z"]))
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "looplib.checkpoint" and metadata["version"] == "2"
    assert sorted(metadata) == ["extra", "format", "sha256", "size", "tree", "version"]


def test_tensor_names_never_collide(tmp_path: Path) -> None:
    tree = {
        "a.b": torch.tensor(1),
        "a": {"b": torch.tensor(2)},
        "__metadata__": torch.tensor(3),
        "l": [torch.tensor(4), (torch.tensor(5),)],
        "a.b#2": torch.tensor(6),
    }
    path = tmp_path / "c.safetensors"
    assert_round_trip(tree, path)
    assert {k: int(v) for k, v in load_file(path).items()} == {
        "a.b": 1,
        "a.b#2": 2,
        "__metadata__#2": 3,
        "l.0": 4,
        "l.1.0": 5,
        "a.b#2#2": 6,
    }
    assert list(load_file(save(torch.tensor(7), tmp_path / "root.safetensors"))) == ["obj"]


def test_shared_storage_views_and_repeats_are_saved_as_copies(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    tree = {"base": base, "row": base[1], "t": base.t(), "again": base, "step": base[:, ::2]}
    out = assert_round_trip(tree, tmp_path / "c.safetensors")
    assert out["base"] is not out["again"]
    assert out["base"].untyped_storage().data_ptr() != out["row"].untyped_storage().data_ptr()
    assert load_file(tmp_path / "c.safetensors")["row"].equal(base[1])


@pytest.mark.parametrize(
    "dtype",
    [
        *DTYPES,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.complex32,
    ],
)
def test_every_storable_dtype_round_trips_bit_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    raw = (torch.arange(24 * dtype.itemsize) * 37 % 256).to(torch.uint8).reshape(2, 3, -1)
    t = raw.view(dtype) if dtype != torch.bool else (raw % 2).bool()
    with warnings.catch_warnings():  # torch warns that complex32 is experimental
        warnings.simplefilter("ignore", UserWarning)
        tree = {"t": t, "scalar": t.reshape(-1)[0].clone()}
        assert_identical(tree, load(save(tree, tmp_path / "c.safetensors")))


def test_a_dtype_safetensors_cannot_hold_is_refused_at_save(tmp_path: Path) -> None:
    t = torch.zeros(2).to(torch.float8_e4m3fnuz)
    with pytest.raises(TypeError, match=r"save\(obj\): obj\['t'\] must have a dtype a safetensors"):
        save({"t": t}, tmp_path / "c.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# export: a plain state_dict file


def test_export_loads_into_a_fresh_module_with_the_same_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
    )
    state = ll.init(model, ll.optim.sgd(0.1))
    state = state._replace(
        params={k: v + 0.5 for k, v in state.params.items()},
        buffers={k: v + 1 for k, v in state.buffers.items()},
    )
    path = ll.export(state, tmp_path / "model.safetensors")
    fresh = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
    )
    fresh.load_state_dict(load_file(path))  # strict: exactly the module's names
    x = torch.randn(5, 3)
    expected = torch.func.functional_call(model.eval(), {**state.params, **state.buffers}, (x,))
    assert torch.equal(fresh.eval()(x), expected)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(ValueError, match=r"It looks like a plain safetensors file"):
        load(path)


def test_export_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"export\(state=.*\): state must be a looplib TrainState"):
        ll.export({"w": torch.ones(1)}, tmp_path / "m.safetensors")  # type: ignore[arg-type]
    state = ll.init(torch.nn.Linear(1, 1), ll.optim.sgd(0.1))
    bad = state._replace(params={"w": torch.ones(1, dtype=torch.complex64)})
    with pytest.raises(TypeError, match=r"export\(state\): state.params\['w'\] must be real"):
        ll.export(bad, tmp_path / "m.safetensors")
    twice = state._replace(buffers={"weight": torch.ones(1)})
    with pytest.raises(ValueError, match=r"repeats state.params\['weight'\]"):
        ll.export(twice, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# What load refuses before reading: anything but a regular file


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)

    def timeout(*args: Any) -> None:
        raise TimeoutError("load blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(10)
    try:
        for func in (load, load_with_extra):
            with pytest.raises(ValueError, match=r"path must name a regular file.*named pipe"):
                func(fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_links_directories_and_bad_paths(tmp_path: Path) -> None:
    loop_a, loop_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    os.symlink(loop_b, loop_a)
    os.symlink(loop_a, loop_b)
    p = str(loop_a)
    with pytest.raises(ValueError, match=re.escape(f"load(path={p!r}): path must name a regular")):
        load(loop_a)
    with pytest.raises(ValueError, match=r"symbolic link that leads back to itself"):
        load(loop_a)
    with pytest.raises(IsADirectoryError, match=r"load\(path=.*\): path must name a checkpoint"):
        load(tmp_path)
    file = save([torch.ones(1)], tmp_path / "c.safetensors")
    with pytest.raises(FileNotFoundError, match=r"A component of the path is a file"):
        load(file / "inside")
    link = tmp_path / "latest.safetensors"
    os.symlink(file, link)  # a link to a checkpoint is fine
    assert_identical(load(link), [torch.ones(1)])


def test_an_old_format_file_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    path.write_bytes(b"\x89looplib\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match=r"looplib's checkpoint format version 1"):
        load(path)


# ---------------------------------------------------------------------------------------------
# Crafted headers (a valid size and digest, as an attacker can write): clear errors, bounded work


def crafted(path: Path, tensors: dict[str, Any], tree: Any, data: bytes = b"", **more: Any) -> Path:
    """A checkpoint of ``tensors`` (header entries) and ``tree``, metadata updated by ``more``."""
    metadata = {"version": "2", "tree": tree, "extra": None, **more}
    write_format(path, {"metadata": metadata, "tensors": tensors}, data)
    return path


def entry(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize(
    ("tensors", "tree", "data", "message"),
    [
        ({"w": entry(dtype=["F32"])}, {"tensor": "w"}, bytes(8), r"dtype \"\['F32'\]\" is not"),
        ({"w": entry(dtype="F128")}, {"tensor": "w"}, bytes(8), r"dtype 'F128' is not one of"),
        ({"w": entry(shape=[2**63])}, {"tensor": "w"}, bytes(8), r"needs 36893488147419103232 "),
        ({"w": entry(shape=[2**64, 0])}, {"tensor": "w"}, bytes(8), r"needs 0 bytes"),
        ({"w": entry(shape=[-2])}, {"tensor": "w"}, bytes(8), r"not an int >= 0"),
        ({"w": entry(shape=[True, 2])}, {"tensor": "w"}, bytes(8), r"not an int >= 0"),
        ({"w": entry(shape=[2.0])}, {"tensor": "w"}, bytes(8), r"not an int >= 0"),
        ({"w": entry(shape="2")}, {"tensor": "w"}, bytes(8), r"shape is not a list"),
        ({"w": entry(shape=[1] * 65)}, {"tensor": "w"}, bytes(8), r"at most 64 ints"),
        ({"w": entry(offsets=["0", 8])}, {"tensor": "w"}, bytes(8), r"are not ints"),
        ({"w": entry(offsets=[8, 0])}, {"tensor": "w"}, bytes(8), r"0 <= begin <= end"),
        ({"w": entry(offsets=[0, 8, 9])}, {"tensor": "w"}, bytes(8), r"not a pair of ints"),
        ({"w": entry()}, {"tensor": "w"}, bytes(16), r"hold 8 bytes of data, the file has 16"),
        ({"w": entry(offsets=[8, 16])}, {"tensor": "w"}, bytes(16), r"starts at byte 8, not 0"),
        (
            {"v": entry(), "w": entry(offsets=[4, 12])},
            [{"tensor": "v"}, {"tensor": "w"}],
            bytes(12),
            r"'w' starts at byte 4, not 8",
        ),
        ({"w": {"dtype": "F32", "shape": [0]}}, {"tensor": "w"}, b"", r"not a dict of dtype"),
        ({"w": [1]}, {"tensor": "w"}, b"", r"not a dict of dtype"),
        ({"w": entry()}, {"list": [{"tensor": "w"}] * 2}, bytes(8), r"'w' used twice"),
        ({"w": entry(), "x": entry(offsets=[8, 16])}, {"tensor": "w"}, bytes(16), r"'x' is not"),
        ({"w": entry("F64", [2], [0, 16])}, {"tensor": "w", "dtype": "complex64"}, bytes(16), "co"),
        ({"w": entry(shape=[2, 1])}, {"tensor": "w", "dtype": "complex64"}, bytes(8), r"complex"),
        ({"w": entry()}, {"tensor": "w", "dtype": "float32"}, bytes(8), r"complex tensor 'w'"),
        ({"w": entry()}, {"tensor": ["w"]}, bytes(8), r"tensor name \['w'\] at obj"),
        ({}, {"dict": [["k", None, 3]]}, b"", r"dict entry \['k', None, 3\] at obj"),
        ({}, {"dict": [["k", 1], ["k", 2]]}, b"", r"dict key 'k' repeated at obj"),
        ({}, {"namedtuple": 1, "fields": [], "values": []}, b"", r"NamedTuple node at obj"),
        ({}, {"namedtuple": "x", "fields": ["a"], "values": []}, b"", r"NamedTuple node at obj"),
        ({}, {"list": 1}, b"", r"node \{'list': 1\} at obj"),
    ],
)
def test_crafted_headers_are_malformed_not_raw_errors(
    tmp_path: Path, tensors: dict[str, Any], tree: Any, data: bytes, message: str
) -> None:
    path = crafted(tmp_path / "c.safetensors", tensors, tree, data)
    for func in (load, load_with_extra):
        with pytest.raises(ValueError) as info:
            func(path)
        assert type(info.value) is ValueError  # looplib's own error, not a library's
        assert "path must be a well-formed looplib checkpoint" in str(info.value)
        assert re.search(message, str(info.value)), str(info.value)


def test_crafted_metadata_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tree": Text("not json")}, r"tree is not JSON"),
        ({"extra": Text("[1")}, r"extra is not JSON"),
        ({"version": "99999999"}, r"malformed \(version '99999999'\)"),
        ({"x": 1}, r"a __metadata__ value that is not a str"),
        ({"x": "1"}, r"malformed \(metadata keys"),
        # A second "format" after the fixed one: safetensors readers would see another value.
        ({"format ": "other"}, r"repeats format, sha256 or size with another value"),
    ]
    for more, message in cases:
        crafted(path, {}, more.pop("tree", None), **more)
        with pytest.raises(ValueError, match=message):
            load(path)


def test_a_million_empty_tensors_are_refused_at_once(tmp_path: Path) -> None:
    n = 1_000_000
    empty = '{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    tensors = Text(",".join(f'"t{i}":{empty}' for i in range(n)))
    tree = Text('{"list":[' + ",".join(f'{{"tensor":"t{i}"}}' for i in range(n)) + "]}")
    path = crafted(tmp_path / "c.safetensors", tensors, tree)  # type: ignore[arg-type]
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"malformed \(a header of \d+ bytes; at most"):
        load(path)
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    ("bound", "value", "message"),
    [
        ("MAX_TENSORS", 3, r"malformed \(4 tensors; at most 3"),
        ("MAX_HEADER_BYTES", 300, r"malformed \(a header of \d+ bytes; at most 300"),
        ("MAX_JSON_ITEMS", 20, r"malformed \(more than 20 JSON values"),
    ],
)
def test_load_and_save_keep_the_same_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bound: str, value: int, message: str
) -> None:
    tree = {f"t{i}": torch.ones(1) for i in range(4)}
    path = save(tree, tmp_path / "c.safetensors")
    monkeypatch.setattr(_tensorfile, bound, value)
    with pytest.raises(ValueError, match=message):
        load(path)
    with pytest.raises(ValueError, match=r"save\(obj\): obj is too large for one checkpoint"):
        save(tree, tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


def test_trees_too_deep_or_too_large_are_refused_on_both_sides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep: Any = torch.ones(1)
    for _ in range(_checkpoint.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ValueError, match=r"save\(obj\): obj(\[0\])+ is nested more than 100"):
        save(deep, tmp_path / "c.safetensors")
    node: Any = None
    for _ in range(_checkpoint.MAX_DEPTH + 2):
        node = {"list": [node]}
    with pytest.raises(ValueError, match=r"malformed \(a tree nested more than 100 deep"):
        load(crafted(tmp_path / "deep.safetensors", {}, node))
    text = Text('{"list":[' * 5000 + "null" + "]}" * 5000)  # too deep for json to parse
    with pytest.raises(ValueError, match=r"malformed \(tree nested too deeply\)"):
        load(crafted(tmp_path / "deeper.safetensors", {}, text))
    monkeypatch.setattr(_checkpoint, "MAX_NODES", 5)
    with pytest.raises(ValueError, match=r"too large.*its tree has more than 5 nodes"):
        save([1, 2, 3, 4, 5], tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"malformed \(a tree of more than 5 nodes\)"):
        load(crafted(tmp_path / "wide.safetensors", {}, {"list": [1, 2, 3, 4, 5]}))
