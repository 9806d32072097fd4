"""The safetensors files looplib writes and reads: layout, digest, atomic writes, strict reading.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (the
header: ``"__metadata__"``, a str -> str dict, and one ``{"dtype", "shape", "data_offsets"}``
entry per tensor name), then the tensors' bytes. looplib writes the header itself, so that a
checkpoint's marker, digest and size sit at fixed places at its start::

    {"__metadata__":{"format":"looplib.checkpoint","sha256":"<64 hex>","size":"<20 digits>",
                     ...more metadata...},"<name>":{"dtype":"F32","shape":[2,3],
                     "data_offsets":[0,24]},...}

padded with spaces to a multiple of 8 bytes. ``size`` is the file's length in bytes; ``sha256``
is the SHA-256 of the whole file with those 64 hex digits written as ``0``. Tensors are laid out
by element size, largest first, so each starts aligned; each is stored as its own copy, in C
order, little-endian.

Reading checks, in order and before anything is allocated: that ``path`` is a regular file
(``stat`` first; opened non-blocking), the marker, the size, the digest, then every field of the
header (types, dtypes from an allowlist, shapes of non-negative ints whose byte sizes match the
offsets, offsets that tile the data exactly, counts and sizes within the bounds below).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple, NoReturn

import torch

# The bounds a header must keep (save refuses to write a file that breaks them, so every file
# save writes can be read): its length, the JSON values in it (counted, before parsing, as an
# upper bound: commas plus opening brackets and braces), the tensors, and a tensor's dimensions.
MAX_HEADER_BYTES = 64 << 20
MAX_JSON_ITEMS = 1 << 21
MAX_TENSORS = 1 << 17
MAX_DIMS = 64

CHECKPOINT_FORMAT = "looplib.checkpoint"
_LENGTH = struct.Struct("<Q")
_MARKER = b'{"__metadata__":{"format":"looplib.checkpoint","sha256":"'
_DIGEST_AT = _LENGTH.size + len(_MARKER)
_FIXED = re.compile(
    rb'\{"__metadata__":\{"format":"looplib\.checkpoint","sha256":"(.{64})","size":"(.{20})",',
    re.DOTALL,
)
_FIXED_LEN = len(_MARKER) + 64 + len('","size":"') + 20 + len('",')
_OLD_MAGIC = b"\x89looplib\r\n\x1a\n"  # looplib's own binary format, version 1
_CHUNK = 1 << 22

# torch dtype -> safetensors dtype. Complex tensors are stored as torch.view_as_real (a trailing
# dimension of 2, real then imaginary part), which every safetensors version reads.
STORAGE: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
COMPLEX: dict[torch.dtype, torch.dtype] = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}
_FROM_STORAGE = {name: dtype for dtype, name in STORAGE.items()}

_LOAD_HINT = "Load an earlier checkpoint; this one cannot be recovered."
_NOT_FOUND = "No file exists there; check the path, or find one with latest_checkpoint(directory)."
_NOT_DIRECTORY = "A component of the path is a file, not a directory; check the path."
_IS_DIR = "It is a directory; for rotating checkpoints use latest_checkpoint(directory)."
_SPECIAL = (
    "It is {kind}, not a regular file; reading it could block or never end. Pass the path of a "
    "checkpoint file."
)
_LOOP = "It is a symbolic link that leads back to itself (a loop); fix or remove the link."
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
_FOREIGN_SAFETENSORS = (
    " It looks like a plain safetensors file (ll.export and safetensors.torch.save_file write "
    "these); read it with safetensors.torch.load_file(path)."
)
_OLD_FORMAT = (
    "It is in looplib's checkpoint format version 1 (its own binary layout), which this looplib "
    "no longer reads; load it with the looplib that wrote it and save it again."
)
_MALFORMED = (
    "Its digest matches but its header is malformed ({detail}), so looplib.save did not write it; "
    "do not trust this file."
)
_SHRANK = "It changed while being read; read it again once nothing is writing it."


def fail_path(
    func: str, arg: str, rule: str, path: Path, fix: str = "", exc: type[Exception] = ValueError
) -> NoReturn:
    """Raise ``exc`` with looplib's standard message, showing the whole path (never shortened)."""
    shown = repr(str(path))
    raise exc(f"{func}({arg}={shown}): {arg} {rule}, got {shown}." + (f" {fix}" if fix else ""))


_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


class Entry(NamedTuple):
    """One tensor of a file: its stored dtype and shape, and where its bytes are in the data."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class Header(NamedTuple):
    metadata: dict[str, str]
    entries: dict[str, Entry]
    data_start: int


# ---------------------------------------------------------------------------------------------
# Writing


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


def temp_name(name: str) -> str:
    """The temporary sibling an atomic write of ``name`` goes through."""
    return f".{name}.looplib-{secrets.token_hex(8)}.tmp"


TEMP_PATTERN = r"\.(?P<name>.+)\.looplib-[0-9a-f]{16}\.tmp"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary sibling: ``path`` is the old file or the new, never half.

    The order is: write, flush, fsync the file, rename over ``path``, fsync the directory.
    """
    tmp = path.with_name(temp_name(path.name))
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def storage_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a plain contiguous CPU tensor of a storable dtype) as the tensor a file holds."""
    return torch.view_as_real(t) if t.dtype in COMPLEX else t


def _tensor_chunks(t: torch.Tensor) -> Iterator[memoryview]:
    """The bytes of a contiguous CPU tensor, copied through a buffer (no pointer arithmetic).

    Each chunk is valid only until the next is asked for."""
    flat = t.reshape(-1).view(torch.uint8)
    n = flat.numel()
    if n == 0:
        return
    buffer = bytearray(min(n, _CHUNK))
    staging = torch.frombuffer(buffer, dtype=torch.uint8)
    view = memoryview(buffer)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        staging[: stop - start].copy_(flat[start:stop])
        yield view[: stop - start]


def count_items(text: str) -> int:
    """An upper bound on the JSON values in ``text``, without parsing it."""
    return text.count(",") + text.count("[") + text.count("{") + 1


def layout(tensors: list[tuple[str, torch.Tensor]]) -> tuple[list[tuple[str, torch.Tensor]], str]:
    """The tensors in file order (largest elements first, so each starts aligned) and the JSON
    of their header entries, without the enclosing braces."""
    ordered = sorted(tensors, key=lambda kt: -kt[1].element_size())
    rows = {}
    offset = 0
    for key, t in ordered:
        n = t.numel() * t.element_size()
        rows[key] = {
            "dtype": STORAGE[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    return ordered, json.dumps(rows, separators=(",", ":"))[1:-1]


def header_bytes(metadata: str, entries: str) -> bytes:
    """The header: ``{"__metadata__":{<metadata>},<entries>}``, padded to a multiple of 8."""
    body = '{"__metadata__":{' + metadata + "}" + ("," + entries if entries else "") + "}"
    raw = body.encode("ascii")
    return raw + b" " * (-(len(raw) + _LENGTH.size) % 8)


def write_file(
    f: IO[bytes], header: bytes, tensors: list[tuple[str, torch.Tensor]], *, digest: bool
) -> None:
    """Write a safetensors file: length, ``header``, each tensor's bytes (in ``layout`` order).

    With ``digest``, ``header`` starts with the checkpoint marker and a zeroed digest, which is
    filled in at the end.
    """
    sha = hashlib.sha256()
    first = _LENGTH.pack(len(header)) + header
    _write_chunk(f, first)
    sha.update(first)
    for _, t in tensors:
        for chunk in _tensor_chunks(t):
            _write_chunk(f, chunk)
            sha.update(chunk)
    if digest:
        f.seek(_DIGEST_AT)
        _write_chunk(f, sha.hexdigest().encode("ascii"))


def checkpoint_metadata(size: int, rest: str) -> str:
    """The checkpoint's metadata: marker, a zeroed digest, its size, then ``rest``."""
    fixed = f'"format":"{CHECKPOINT_FORMAT}","sha256":"{"0" * 64}","size":"{size:020d}",'
    return fixed + rest


# ---------------------------------------------------------------------------------------------
# Reading


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


class Reader:
    """An open checkpoint file, and the checks that find what is wrong with it."""

    def __init__(self, func: str, path: Path) -> None:
        self.func = func
        self.path = path
        self.file = self._open()
        self.size = os.fstat(self.file.fileno()).st_size

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def bad(self, rule: str, detail: str, exc: type[Exception] = ValueError) -> NoReturn:
        fail_path(self.func, "path", rule, self.path, detail, exc)

    def malformed(self, detail: str) -> NoReturn:
        self.bad("must be a well-formed looplib checkpoint", _MALFORMED.format(detail=detail))

    def _refuse(self, mode: int) -> NoReturn:
        if stat.S_ISDIR(mode):
            self.bad("must name a checkpoint file", _IS_DIR, IsADirectoryError)
        self.bad("must name a regular file", _SPECIAL.format(kind=_kind(mode)))

    def _open(self) -> IO[bytes]:
        """Open ``path`` for reading only if it is a regular file; never block."""
        try:
            mode: int | OSError = os.stat(self.path).st_mode
        except OSError as e:
            mode = e  # raised below, outside the handler, so the message stands alone
        if isinstance(mode, FileNotFoundError):
            self.bad("must name an existing checkpoint file", _NOT_FOUND, FileNotFoundError)
        if isinstance(mode, NotADirectoryError):
            self.bad("must name an existing checkpoint file", _NOT_DIRECTORY, FileNotFoundError)
        if isinstance(mode, OSError):
            if mode.errno == errno.ELOOP:
                self.bad("must name a regular file", _LOOP)
            self.bad("must name a readable file", f"{mode.strerror}.", type(mode))
        if not stat.S_ISREG(mode):
            self._refuse(mode)
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd: int | OSError = os.open(self.path, flags | getattr(os, "O_NOCTTY", 0))
        except OSError as e:
            fd = e
        if isinstance(fd, OSError):
            self.bad("must name a readable file", f"{fd.strerror}.", type(fd))
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # it was swapped for something else since the stat
            os.close(fd)
            self._refuse(mode)
        return os.fdopen(fd, "rb")

    def _read_exact(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.file.readinto(view[got:])  # type: ignore[attr-defined]
            if not n:
                self.bad("must be a complete looplib checkpoint", _SHRANK)
            got += n

    def checkpoint_header(self) -> Header:
        """Check marker, size, digest and header of a looplib checkpoint; return the header."""
        size, complete = self.size, "must be a complete looplib checkpoint"
        if size == 0:
            self.bad(complete, _EMPTY)
        head = self.file.read(_LENGTH.size + _FIXED_LEN)
        if head.startswith(_OLD_MAGIC):
            self.bad("must be in a checkpoint format this looplib reads", _OLD_FORMAT)
        seen = head[_LENGTH.size : _DIGEST_AT]
        if len(head) < _LENGTH.size + _FIXED_LEN:
            # Too short to hold the fixed fields: a cut-off checkpoint, or not one at all. Ours
            # start with a small header length (its high bytes zero), then the marker.
            if not any(head[4 : _LENGTH.size]) and _MARKER.startswith(seen):
                self.bad(complete, _TRUNCATED.format(size=size, expected="more"))
            self._foreign(head)
        if seen != _MARKER:
            self._foreign(head)
        fixed = _FIXED.match(head, _LENGTH.size)
        digest = fixed.group(1) if fixed else b""
        if fixed is None or re.fullmatch(rb"[0-9a-f]{64}", digest) is None:
            self.bad("must be an intact looplib checkpoint", _CORRUPTED)
        if re.fullmatch(rb"[0-9]{20}", fixed.group(2)) is None:
            self.bad("must be an intact looplib checkpoint", _CORRUPTED)
        expected = int(fixed.group(2))
        if size < expected:
            self.bad(complete, _TRUNCATED.format(size=size, expected=expected))
        if size > expected:
            self.bad(
                "must be an intact looplib checkpoint",
                _TOO_LONG.format(size=size, expected=expected),
            )
        if self._digest() != digest.decode("ascii"):
            self.bad("must be an intact looplib checkpoint", _CORRUPTED)
        header = self._header(_LENGTH.unpack_from(head)[0])
        fields = [header.metadata.get(k) for k in ("format", "sha256", "size")]
        if fields != [CHECKPOINT_FORMAT, digest.decode("ascii"), fixed.group(2).decode("ascii")]:
            self.malformed("its metadata repeats format, sha256 or size with another value")
        return header

    def _foreign(self, head: bytes) -> NoReturn:
        hint = ""
        if head.startswith(b"PK\x03\x04"):
            hint = _FOREIGN_ZIP
        elif head.startswith(b"\x80"):
            hint = _FOREIGN_PICKLE
        elif (
            len(head) > _LENGTH.size
            and head[_LENGTH.size : _LENGTH.size + 1] == b"{"
            and _LENGTH.unpack_from(head)[0] <= self.size - _LENGTH.size
        ):
            hint = _FOREIGN_SAFETENSORS
        self.bad("must be a checkpoint written by looplib.save", _FOREIGN + hint)

    def _digest(self) -> str:
        """SHA-256 of the file with the 64 hex digits of its digest read as ``0``."""
        sha = hashlib.sha256()
        buffer = bytearray(min(self.size, _CHUNK))
        view = memoryview(buffer)
        self.file.seek(0)
        done = 0
        while done < self.size:
            n = min(self.size - done, _CHUNK)
            self._read_exact(view[:n])
            if done <= _DIGEST_AT < done + n:  # the header fits in the first chunk
                buffer[_DIGEST_AT - done : _DIGEST_AT - done + 64] = b"0" * 64
            sha.update(view[:n])
            done += n
        return sha.hexdigest()

    def _header(self, length: int) -> Header:
        if length > MAX_HEADER_BYTES:
            self.malformed(f"a header of {length} bytes; at most {MAX_HEADER_BYTES} are allowed")
        if _LENGTH.size + length > self.size:
            self.malformed(f"a header of {length} bytes in a file of {self.size}")
        self.file.seek(_LENGTH.size)
        raw = bytearray(length)
        self._read_exact(memoryview(raw))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.malformed("not UTF-8")
        if count_items(text) > MAX_JSON_ITEMS:
            self.malformed(f"more than {MAX_JSON_ITEMS} JSON values")
        header = self.parse_json(text, "header")
        if type(header) is not dict or type(header.get("__metadata__")) is not dict:
            self.malformed("no __metadata__")
        metadata = header.pop("__metadata__")
        if not all(type(v) is str for v in metadata.values()):
            self.malformed("a __metadata__ value that is not a str")
        data_start = _LENGTH.size + length
        return Header(metadata, self._entries(header, self.size - data_start), data_start)

    def parse_json(self, text: str, what: str) -> Any:
        """``json.loads``; any failure is a malformed header (raised outside the handler)."""
        try:
            return json.loads(text)
        except RecursionError:
            problem = f"{what} nested too deeply"
        except ValueError as e:
            problem = f"{what} is not JSON: {str(e)[:100]}"
        self.malformed(problem)

    def _entries(self, table: dict[str, Any], data_len: int) -> dict[str, Entry]:
        if len(table) > MAX_TENSORS:
            self.malformed(f"{len(table)} tensors; at most {MAX_TENSORS} are allowed")
        entries = {}
        for key, spec in table.items():
            entries[key] = self._entry(key, spec)
        position = 0
        for key, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
            if e.begin != position:
                self.malformed(f"tensor {key!r} starts at byte {e.begin}, not {position}")
            position = e.end
        if position != data_len:
            self.malformed(f"the tensors hold {position} bytes of data, the file has {data_len}")
        return entries

    def _entry(self, key: str, spec: Any) -> Entry:
        where = f"tensor {key[:200]!r}"
        if type(spec) is not dict or spec.keys() != _ENTRY_KEYS:
            self.malformed(f"{where}: not a dict of dtype, shape and data_offsets")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if type(dtype) is not str or dtype not in _FROM_STORAGE:
            self.malformed(
                f"{where}: dtype {str(dtype)[:40]!r} is not one of {sorted(_FROM_STORAGE)}"
            )
        if type(shape) is not list or len(shape) > MAX_DIMS:
            self.malformed(f"{where}: shape is not a list of at most {MAX_DIMS} ints")
        if not all(type(n) is int and n >= 0 for n in shape):
            self.malformed(f"{where}: shape {str(shape)[:80]} has an entry that is not an int >= 0")
        if type(offsets) is not list or len(offsets) != 2:
            self.malformed(f"{where}: data_offsets is not a pair of ints")
        begin, end = offsets
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
            self.malformed(
                f"{where}: data_offsets {str(offsets)[:80]} are not ints 0 <= begin <= end"
            )
        torch_dtype = _FROM_STORAGE[dtype]
        need = math.prod(shape) * torch_dtype.itemsize  # Python ints: no overflow
        if need != end - begin:
            self.malformed(
                f"{where}: shape {str(shape)[:80]} needs {need} bytes, its offsets give {end - begin}"
            )
        return Entry(torch_dtype, tuple(shape), begin, end)

    def read_tensors(self, data_start: int, items: list[tuple[Entry, torch.Tensor]]) -> None:
        """Read each entry's bytes into its contiguous tensor (any device; same byte count).

        ``items`` must be in file order; the data is read once, front to back, in large blocks.
        """
        total = self.size - data_start
        buffer = bytearray(min(total, _CHUNK))
        if not buffer:
            return
        staging = torch.frombuffer(buffer, dtype=torch.uint8)
        view = memoryview(buffer)
        self.file.seek(data_start)
        start = have = 0  # the buffer holds the data's bytes [start, start + have)
        for entry, t in items:
            flat = t.reshape(-1).view(torch.uint8)
            at = entry.begin
            while at < entry.end:
                if at >= start + have:
                    start += have
                    have = min(_CHUNK, total - start)
                    self._read_exact(view[:have])
                n = min(entry.end, start + have) - at
                flat[at - entry.begin : at - entry.begin + n].copy_(
                    staging[at - start : at - start + n]
                )
                at += n
