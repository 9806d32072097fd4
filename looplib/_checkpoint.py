"""Checkpoints: write a state pytree to disk atomically and read it back without running code.

A checkpoint holds one pytree (usually a ``TrainState``) and optional JSON metadata. Loading
never unpickles anything: the tree is described in JSON, tensors are raw bytes, and NamedTuple
nodes are rebuilt only from classes registered with :func:`register_checkpoint_type`.

File format, version 1 (integers little-endian)::

    magic        12 bytes   b"\\x89looplib\\r\\n\\x1a\\n"
    header_len    8 bytes   unsigned int
    data_len      8 bytes   unsigned int
    header       header_len bytes, UTF-8 JSON:
                   {"format": "looplib.checkpoint", "version": 1,
                    "tree": <node>, "tensors": [{"dtype": "float32", "shape": [2, 3]}, ...],
                    "extra": <JSON value>}
    data         data_len bytes: each tensor's elements in C order, as stored on a
                 little-endian CPU, one tensor after another, no padding
    digest       32 bytes   SHA-256 of every byte above

A tree ``<node>`` is a JSON scalar (``null``, bool, int, float, str: that Python value itself) or
an object with one of these shapes: ``{"tensor": i}`` (index into ``tensors``),
``{"list": [...]}``, ``{"tuple": [...]}``, ``{"dict": [[key, node], ...]}``,
``{"ordereddict": [[key, node], ...]}``, ``{"namedtuple": name, "fields": [...], "values": [...]}``.
Floats may be ``NaN``/``Infinity``, written as Python's ``json`` module writes them.

Every later version keeps the magic, the two lengths and the trailing digest, so a file from a
newer looplib is recognised and refused with an "upgrade" message rather than misread.

What a round trip keeps: the tree's structure and node types, every tensor's dtype, shape and bytes,
scalar leaves. What it drops: devices (tensors load on ``map_location``), strides (tensors load
contiguous), ``requires_grad``, tensor subclasses (an ``nn.Parameter`` loads as a plain tensor), and
memory shared between tensors (each tensor is stored as its own copy).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NamedTuple, NoReturn, TypeVar

import torch

from ._types import TrainState, describe
from ._validate import fail

__all__ = [
    "FORMAT",
    "VERSION",
    "load",
    "load_with_extra",
    "register_checkpoint_type",
    "save",
]

FORMAT = "looplib.checkpoint"
VERSION = 1
_MAGIC = b"\x89looplib\r\n\x1a\n"
_LENGTHS = struct.Struct("<QQ")
_PREFIX = len(_MAGIC) + _LENGTHS.size
_DIGEST = 32
_CHUNK = 1 << 20

_C = TypeVar("_C", bound=type)
_TYPES: dict[str, type] = {}  # stored name -> class; the only classes load() ever builds
_NAMES: dict[type, str] = {}  # class -> the name save() records

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex32,
        torch.complex64,
        torch.complex128,
        *(
            getattr(torch, name)
            for name in (
                "uint16",
                "uint32",
                "uint64",
                "float8_e4m3fn",
                "float8_e5m2",
                "float8_e4m3fnuz",
                "float8_e5m2fnuz",
            )
            if isinstance(getattr(torch, name, None), torch.dtype)
        ),
    )
}

_SCALARS = (bool, int, float, str)

_LOAD_HINT = "Load an earlier checkpoint; this one cannot be recovered."
_NOT_FOUND = "No file exists there; check the path, or find one with latest_checkpoint(directory)."
_IS_DIR = "It is a directory; for rotating checkpoints use latest_checkpoint(directory)."
_EMPTY = "The file is empty: it was cut short by an interrupted write or copy. " + _LOAD_HINT
_TRUNCATED = (
    "The file is truncated: it has {size} bytes but its header says {expected}; it was cut short "
    "by an interrupted copy or a full disk, or its header is damaged. " + _LOAD_HINT
)
_TOO_LONG = (
    "The file is damaged: it has {size} bytes but its header says {expected}; bytes were appended "
    "or its header was changed. " + _LOAD_HINT
)
_CORRUPTED = (
    "The file is corrupted: its SHA-256 digest does not match its contents, so bytes changed after "
    "it was written (a faulty disk or transfer). " + _LOAD_HINT
)
_FOREIGN = "It does not start with the looplib checkpoint marker, so looplib.save did not write it."
_FOREIGN_ZIP = (
    " It looks like a torch.save file (a zip archive); read it with "
    "torch.load(path, weights_only=True)."
)
_FOREIGN_PICKLE = " It looks like a pickle, which load() never reads: unpickling can run code."
_NEWER = "It has format version {version}, written by a newer looplib; upgrade looplib to load it."
_MALFORMED = (
    "Its digest matches but its header is malformed ({detail}), so looplib.save did not write it; "
    "do not trust this file."
)
_UNKNOWN_TYPE = (
    "It stores a NamedTuple {name!r} at {where}, and no class is registered under that name. Import "
    "the module that defines the class (looplib's modules register theirs on import), or call "
    "register_checkpoint_type(cls) (with name={name!r} if the class has moved) before loading."
)
_FIELDS_CHANGED = (
    "It stores {name!r} at {where} with fields {stored}, but the registered class has fields "
    "{current}; the class changed since the checkpoint was written. Register a class with the "
    "stored fields under that name to read it."
)
_ALLOWED = (
    "a tensor, None, bool, int, float, str, or a dict (str keys), list, tuple or registered "
    "NamedTuple of those"
)


# ---------------------------------------------------------------------------------------------
# The NamedTuple allowlist


def _is_namedtuple_class(cls: Any) -> bool:
    return (
        isinstance(cls, type)
        and issubclass(cls, tuple)
        and isinstance(getattr(cls, "_fields", None), tuple)
    )


def register_checkpoint_type(cls: _C, *, name: str | None = None) -> _C:
    """Allow a NamedTuple class in checkpoints: ``save`` records it by name, ``load`` rebuilds it.

    ``load`` never imports a module or looks up a name found in a file; it builds a NamedTuple node
    only if its stored name is registered here. So the module that defines a state class registers
    it at import (``@register_checkpoint_type`` on the class), and importing that module before
    ``load`` is enough. ``looplib.TrainState`` is registered as ``"looplib.TrainState"``.

    Registering the same class again is a no-op. A different class with the same name and the same
    fields replaces the old one (a re-imported module); different fields raise.

    Args:
        cls: a NamedTuple class (``typing.NamedTuple`` or ``collections.namedtuple``).
        name: the name stored in files; default ``f"{cls.__module__}.{cls.__qualname__}"``. Pass a
            stable name to keep old checkpoints loadable after moving the class.

    Returns:
        ``cls`` itself, so this works as a class decorator.

    Example:
        >>> from typing import NamedTuple
        >>> @register_checkpoint_type
        ... class EmaState(NamedTuple):
        ...     decay: float
    """
    func = "register_checkpoint_type"
    if not _is_namedtuple_class(cls):
        fail(
            func,
            "cls",
            "must be a NamedTuple class",
            cls,
            "Define it with typing.NamedTuple; other classes cannot be rebuilt without running code.",
            exc=TypeError,
        )
    key = f"{cls.__module__}.{cls.__qualname__}" if name is None else name
    if not isinstance(key, str) or not key:
        fail(func, "name", "must be a non-empty str or None", name, exc=TypeError)
    old = _TYPES.get(key)
    fields = getattr(cls, "_fields", ())
    if old is not None and old is not cls and getattr(old, "_fields", ()) != fields:
        fail(
            func,
            "cls",
            f"must not take the name {key!r} of a different registered NamedTuple",
            cls,
            f"{key!r} names a class with fields {getattr(old, '_fields', ())}; pass name=... "
            "to register this one under another name.",
        )
    _TYPES[key] = cls
    _NAMES[cls] = key
    return cls


register_checkpoint_type(TrainState, name="looplib.TrainState")


# ---------------------------------------------------------------------------------------------
# Encoding a tree


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (writable when the tensor is)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def _plain_tensor(func: str, where: str, t: torch.Tensor) -> torch.Tensor:
    problem = ""
    if t.layout is not torch.strided:
        problem = f"must be a dense tensor, got layout {t.layout}. Convert it with .to_dense()."
    elif t.is_quantized:
        problem = "must not be quantized. Store t.dequantize() or its int_repr() and scales."
    elif t.device.type == "meta":
        problem = "must hold data, got a tensor on the meta device. Materialize it first."
    elif t.dtype not in _DTYPES.values():
        problem = f"must have one of the dtypes {sorted(_DTYPES)}, got {t.dtype}."
    elif any(n is not None for n in getattr(t, "names", None) or ()):
        problem = "must not have named dimensions. Drop them with t.rename(None)."
    if problem:
        raise TypeError(f"{func}(obj): {where} {problem}")
    return t.detach().resolve_conj().resolve_neg().to("cpu").contiguous()


class _Encoder:
    """Turns a pytree into a JSON-able node, collecting its tensors in order."""

    def __init__(self, func: str) -> None:
        self.func = func
        self.tensors: list[torch.Tensor] = []
        self._open: set[int] = set()  # containers on the current path, to catch cycles

    def encode(self, x: Any, where: str) -> Any:
        if x is None or type(x) in _SCALARS:
            return x
        if isinstance(x, torch.Tensor):
            self.tensors.append(_plain_tensor(self.func, where, x))
            return {"tensor": len(self.tensors) - 1}
        if id(x) in self._open:
            raise ValueError(f"{self.func}(obj): {where} contains itself; a tree has no cycles.")
        self._open.add(id(x))
        try:
            return self._container(x, where)
        finally:
            self._open.discard(id(x))

    def _container(self, x: Any, where: str) -> Any:
        kind = type(x)
        if kind is list or kind is tuple:
            items = [self.encode(v, f"{where}[{i}]") for i, v in enumerate(x)]
            return {kind.__name__: items}
        if kind is dict or kind is OrderedDict:
            pairs = []
            for k, v in x.items():
                if type(k) is not str:
                    raise TypeError(
                        f"{self.func}(obj): {where} must have str keys, got key {describe(k)} of "
                        f"type {type(k).__name__}. Use str keys (e.g. {str(k)!r}) so keys survive "
                        "the trip through JSON unchanged."
                    )
                pairs.append([k, self.encode(v, f"{where}[{k!r}]")])
            return {"dict" if kind is dict else "ordereddict": pairs}
        if _is_namedtuple_class(kind):
            name = _NAMES.get(kind)
            if name is None:
                raise TypeError(
                    f"{self.func}(obj): {where} must be a registered NamedTuple, got an instance "
                    f"of {kind.__module__}.{kind.__qualname__}. Decorate the class with "
                    "@register_checkpoint_type where it is defined, so load() can rebuild it."
                )
            fields = list(kind._fields)
            values = [self.encode(getattr(x, f), f"{where}.{f}") for f in fields]
            return {"namedtuple": name, "fields": fields, "values": values}
        raise TypeError(
            f"{self.func}(obj): {where} must be {_ALLOWED}, got {describe(x)} of type "
            f"{kind.__qualname__}. Convert it (e.g. float(x), torch.as_tensor(x)) or keep it "
            "out of the tree."
        )


def _check_extra(func: str, value: Any, where: str) -> None:
    if value is None or type(value) in _SCALARS:
        return
    if type(value) is list:
        for i, v in enumerate(value):
            _check_extra(func, v, f"{where}[{i}]")
        return
    if type(value) is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise TypeError(
                    f"{func}(extra): {where} must have str keys, got key {describe(k)}. "
                    f"Use str keys (e.g. {str(k)!r})."
                )
            _check_extra(func, v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{func}(extra): {where} must be JSON data (None, bool, int, float, str, list, or dict "
        f"with str keys), got {describe(value)} of type {type(value).__qualname__}. Convert it "
        "(float(x), list(x), t.tolist()) or put tensors in obj."
    )


# ---------------------------------------------------------------------------------------------
# Atomic writes


def _write_chunk(f: IO[bytes], chunk: bytes | memoryview) -> None:
    f.write(chunk)


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary sibling: ``path`` is the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _as_path(func: str, path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        fail(func, "path", "must be a str or os.PathLike", path, exc=TypeError)
    return Path(path)


def _save(func: str, obj: Any, path: Path, extra: Any) -> Path:
    encoder = _Encoder(func)
    tree = encoder.encode(obj, "obj")
    _check_extra(func, extra, "extra")
    tensors = encoder.tensors
    specs = [
        {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for t in tensors
    ]
    header = {"format": FORMAT, "version": VERSION, "tree": tree, "tensors": specs, "extra": extra}
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    data_len = sum(t.numel() * t.element_size() for t in tensors)

    if path.is_dir():
        fail(
            func, "path", "must name a file", str(path), "It is a directory.", exc=IsADirectoryError
        )
    if not path.parent.is_dir():
        fail(
            func,
            "path",
            "must be in an existing directory",
            str(path),
            f"Create it first: Path({str(path.parent)!r}).mkdir(parents=True).",
            exc=FileNotFoundError,
        )

    def write(f: IO[bytes]) -> None:
        digest = hashlib.sha256()
        for chunk in (_MAGIC + _LENGTHS.pack(len(header_bytes), data_len), header_bytes):
            _write_chunk(f, chunk)
            digest.update(chunk)
        for t in tensors:
            raw = _raw(t)
            _write_chunk(f, raw)
            digest.update(raw)
        _write_chunk(f, digest.digest())

    _atomic_write(path, write)
    return path


def save(obj: Any, path: str | os.PathLike[str], *, extra: Any = None) -> Path:
    """Write the pytree ``obj`` and JSON metadata ``extra`` to ``path``, atomically and durably.

    The file is written to a temporary sibling, flushed and fsynced, renamed over ``path`` with
    ``os.replace``, and the directory is fsynced. So when ``save`` returns, ``path`` holds the whole
    checkpoint; when it raises (an error, a full disk, an interrupt), ``path`` holds what it held
    before and no temporary file is left. Everything is checked before the first byte is written.

    Args:
        obj: a pytree of dicts (str keys), OrderedDicts, lists, tuples, registered NamedTuples and
            ``None``, with tensor, bool, int, float and str leaves; usually a ``TrainState``.
            Tensors are copied to the CPU, detached and made contiguous; dtype, shape and bytes
            are kept exactly.
        path: the file to write; its directory must exist.
        extra: JSON data stored beside the tree (e.g. a metric history, the epoch, the data
            position): ``None``, bool, int, float (NaN and inf included), str, lists and dicts with
            str keys. Read it back with :func:`load_with_extra`.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = save({"w": torch.ones(2)}, f"{d}/state.pt", extra={"epoch": 3})
        ...     load_with_extra(p)
        ({'w': tensor([1., 1.])}, {'epoch': 3})
    """
    return _save("save", obj, _as_path("save", path), extra)


# ---------------------------------------------------------------------------------------------
# Reading


class _Header(NamedTuple):
    tree: Any
    specs: list[tuple[torch.dtype, tuple[int, ...]]]
    extra: Any


def _read_exact(f: IO[bytes], view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            return False
        got += n
    return True


class _Reader:
    """Checks a file is an intact checkpoint of a supported version, then builds its tree."""

    def __init__(self, func: str, path: Path) -> None:
        self.func = func
        self.path = path

    def bad(self, rule: str, detail: str, exc: type[Exception] = ValueError) -> NoReturn:
        fail(self.func, "path", rule, str(self.path), detail, exc=exc)

    def read(self, device: torch.device) -> tuple[Any, Any]:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 (closed by the with below)
        except FileNotFoundError:
            self.bad("must name an existing checkpoint file", _NOT_FOUND, FileNotFoundError)
        except IsADirectoryError:
            self.bad("must name a checkpoint file", _IS_DIR, IsADirectoryError)
        with f:
            header_len, data_len = self._check_size_and_digest(f)
            f.seek(_PREFIX)
            header = self._parse_header(f.read(header_len), data_len)
            tensors = []
            for dtype, shape in header.specs:
                t = torch.empty(shape, dtype=dtype)
                if not _read_exact(f, _raw(t)):
                    self.bad("must be a complete looplib checkpoint", "It shrank while being read.")
                tensors.append(t if device.type == "cpu" else t.to(device))
        return _Decoder(self, tensors).decode(header.tree, "obj"), header.extra

    def _check_size_and_digest(self, f: IO[bytes]) -> tuple[int, int]:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_PREFIX)
        complete = "must be a complete looplib checkpoint"
        if not head:
            self.bad(complete, _EMPTY)
        if not head.startswith(_MAGIC):
            if len(head) < len(_MAGIC) and _MAGIC.startswith(head):
                self.bad(complete, _TRUNCATED.format(size=size, expected="more"))
            hint = _FOREIGN_ZIP if head.startswith(b"PK\x03\x04") else ""
            hint = _FOREIGN_PICKLE if head.startswith(b"\x80") else hint
            self.bad("must be a checkpoint written by looplib.save", _FOREIGN + hint)
        if len(head) < _PREFIX:
            self.bad(complete, _TRUNCATED.format(size=size, expected="more"))
        header_len, data_len = _LENGTHS.unpack_from(head, len(_MAGIC))
        expected = _PREFIX + header_len + data_len + _DIGEST
        if size < expected:
            self.bad(complete, _TRUNCATED.format(size=size, expected=expected))
        if size > expected:
            self.bad(
                "must be an intact looplib checkpoint",
                _TOO_LONG.format(size=size, expected=expected),
            )
        f.seek(0)
        digest = hashlib.sha256()
        remaining = size - _DIGEST
        while remaining:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                self.bad(complete, "It shrank while being read.")
            digest.update(chunk)
            remaining -= len(chunk)
        if f.read(_DIGEST) != digest.digest():
            self.bad("must be an intact looplib checkpoint", _CORRUPTED)
        return header_len, data_len

    def malformed(self, detail: str) -> NoReturn:
        self.bad("must be a well-formed looplib checkpoint", _MALFORMED.format(detail=detail))

    def _parse_header(self, raw: bytes, data_len: int) -> _Header:
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            self.malformed("not JSON")
        if type(header) is not dict or header.get("format") != FORMAT:
            self.malformed(f"no format marker {FORMAT!r}")
        version = header.get("version")
        if type(version) is not int or version < 1:
            self.malformed(f"version {version!r}")
        if version > VERSION:
            self.bad(f"must have format version <= {VERSION}", _NEWER.format(version=version))
        if not {"tree", "tensors", "extra"} <= header.keys() or type(header["tensors"]) is not list:
            self.malformed("missing fields")
        specs = []
        total = 0
        for spec in header["tensors"]:
            ok = (
                type(spec) is dict
                and spec.get("dtype") in _DTYPES
                and type(spec.get("shape")) is list
            )
            shape = spec["shape"] if ok else []
            if not ok or not all(type(n) is int and n >= 0 for n in shape):
                self.malformed(f"tensor spec {spec!r}")
            dtype = _DTYPES[spec["dtype"]]
            total += math.prod(shape) * dtype.itemsize
            specs.append((dtype, tuple(shape)))
        if total != data_len:
            self.malformed(f"tensors need {total} bytes of data, the file has {data_len}")
        return _Header(header["tree"], specs, header["extra"])


class _Decoder:
    """Rebuilds a tree from its JSON node; NamedTuples come only from the registry."""

    def __init__(self, reader: _Reader, tensors: list[torch.Tensor]) -> None:
        self.reader = reader
        self.tensors = tensors

    def decode(self, node: Any, where: str) -> Any:
        if node is None or type(node) in _SCALARS:
            return node
        if type(node) is not dict:
            self.reader.malformed(f"node {describe(node)} at {where}")
        keys = sorted(node)
        if keys == ["tensor"]:
            i = node["tensor"]
            if type(i) is not int or not 0 <= i < len(self.tensors):
                self.reader.malformed(f"tensor index {describe(i)} at {where}")
            return self.tensors[i]
        if keys in (["list"], ["tuple"]) and type(node[keys[0]]) is list:
            items = [self.decode(v, f"{where}[{i}]") for i, v in enumerate(node[keys[0]])]
            return items if keys == ["list"] else tuple(items)
        if keys in (["dict"], ["ordereddict"]) and type(node[keys[0]]) is list:
            out: dict[str, Any] = {} if keys == ["dict"] else OrderedDict()
            for pair in node[keys[0]]:
                if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str:
                    self.reader.malformed(f"dict entry {describe(pair)} at {where}")
                out[pair[0]] = self.decode(pair[1], f"{where}[{pair[0]!r}]")
            return out
        if keys == ["fields", "namedtuple", "values"]:
            return self._namedtuple(node, where)
        self.reader.malformed(f"node {describe(node)} at {where}")

    def _namedtuple(self, node: dict[str, Any], where: str) -> Any:
        name, fields, values = node["namedtuple"], node["fields"], node["values"]
        if type(name) is not str or type(fields) is not list or type(values) is not list:
            self.reader.malformed(f"NamedTuple node at {where}")
        if len(fields) != len(values):
            self.reader.malformed(f"NamedTuple node at {where}")
        cls = _TYPES.get(name)
        if cls is None:
            self.reader.bad(
                "must hold only registered NamedTuple types",
                _UNKNOWN_TYPE.format(name=name, where=where),
            )
        current = list(getattr(cls, "_fields", ()))
        if fields != current:
            self.reader.bad(
                "must match the registered NamedTuple types",
                _FIELDS_CHANGED.format(name=name, where=where, stored=fields, current=current),
            )
        return cls(*(self.decode(v, f"{where}.{f}") for f, v in zip(fields, values, strict=True)))


def _device(func: str, map_location: Any) -> torch.device:
    if isinstance(map_location, torch.device):
        return map_location
    if not isinstance(map_location, str):
        fail(func, "map_location", "must be a str or torch.device", map_location, exc=TypeError)
    try:
        return torch.device(map_location)
    except RuntimeError:
        fail(func, "map_location", "must name a device", map_location, "E.g. 'cpu' or 'cuda:0'.")


def load_with_extra(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """Read a checkpoint written by :func:`save`: return ``(obj, extra)``.

    The whole file is verified (marker, length, SHA-256 digest, version) before any of it is
    interpreted; nothing in it is unpickled or imported. A NamedTuple node is rebuilt only from a
    class registered with :func:`register_checkpoint_type`.

    Args:
        path: a file written by :func:`save`.
        map_location: the device for the loaded tensors.

    Returns:
        The tree as saved (same node types, dict order, dtypes, shapes and tensor bytes; tensors
        contiguous, on ``map_location``, not requiring grad) and the ``extra`` JSON data.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated, corrupted, not a looplib checkpoint, from a newer
            looplib, or holds an unregistered NamedTuple type; the message says which.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = save([torch.tensor(7)], f"{d}/c.pt", extra={"history": [{"loss": 0.5}]})
        ...     load_with_extra(p)
        ([tensor(7)], {'history': [{'loss': 0.5}]})
    """
    func = "load_with_extra"
    return _Reader(func, _as_path(func, path)).read(_device(func, map_location))


def load(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> Any:
    """Read the tree of a checkpoint written by :func:`save`; ``load_with_extra(path)[0]``.

    Same checks and guarantees as :func:`load_with_extra`.

    Args:
        path: a file written by :func:`save`.
        map_location: the device for the loaded tensors.

    Returns:
        The tree as saved.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     load(save((torch.zeros(1, dtype=torch.int64), None), f"{d}/c.pt"))
        (tensor([0]), None)
    """
    return _Reader("load", _as_path("load", path)).read(_device("load", map_location))[0]
