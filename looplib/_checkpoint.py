"""Checkpoints: write a state pytree to a safetensors file atomically, read it back running no code.

A checkpoint holds one pytree (usually a ``TrainState``) and optional JSON metadata ``extra``. It
is a safetensors file: ``safetensors.torch.load_file(path)`` gives its tensors by readable name.
Loading never unpickles anything: the tree is described in JSON, tensors are raw bytes, and
NamedTuple nodes are rebuilt only from classes registered with :func:`register_checkpoint_type`.

Format version 2 (the file layout, digest and bounds are in :mod:`looplib._tensorfile`):

* **Tensors**, keyed by their path in the tree: NamedTuple field names, dict keys and list or
  tuple indices joined with ``"."`` (``params.0.weight``, ``opt_state.mu.0.weight``,
  ``slots.accumulate.count``; a tensor at the root is ``obj``). A dict key may itself contain
  ``"."``, so two paths can give one name (``{"a.b": x, "a": {"b": y}}``); the later one in the
  tree then gets ``#2`` appended (``#3``, ... if that is taken too). The tree records each
  tensor's name, so loading never parses names. Complex tensors are stored as
  ``torch.view_as_real`` (a trailing dimension of 2), since safetensors has no complex dtype
  that every reader knows.
* **Metadata** (``__metadata__``, str -> str): ``format`` (``"looplib.checkpoint"``),
  ``sha256`` (the digest of the whole file, its own 64 digits read as ``0``), ``size`` (the
  file's length), ``version`` (``"2"``), ``tree`` and ``extra`` (JSON text).
* **The tree** is a JSON node: a JSON scalar (``null``, bool, int, float, str: that Python value
  itself), or an object of one of these shapes: ``{"tensor": name}`` (``{"tensor": name,
  "dtype": "complex64"}`` for a complex one), ``{"list": [...]}``, ``{"tuple": [...]}``,
  ``{"dict": [[key, node], ...]}``, ``{"ordereddict": [[key, node], ...]}``,
  ``{"namedtuple": name, "fields": [...], "values": [...]}``. Floats may be ``NaN`` or
  ``Infinity``, as Python's ``json`` module writes them.

Every later version keeps the marker, digest and size at the start, so a file from a newer
looplib is recognised and refused with an "upgrade" message rather than misread.

What a round trip keeps: the tree's structure and node types, every tensor's dtype, shape and bytes,
scalar leaves. What it drops: devices (tensors load on ``map_location``), strides (tensors load
contiguous), ``requires_grad``, tensor subclasses (an ``nn.Parameter`` loads as a plain tensor), and
memory shared between tensors (each tensor is stored as its own copy).
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, TypeVar

import torch

from . import _tensorfile as tf
from ._types import TrainState, describe
from ._validate import fail, train_state

__all__ = [
    "FORMAT",
    "VERSION",
    "export",
    "load",
    "load_with_extra",
    "register_checkpoint_type",
    "save",
]

FORMAT = tf.CHECKPOINT_FORMAT
VERSION = 2
MAX_DEPTH = 100  # containers nested in a tree, on save and on load
MAX_NODES = 1 << 18  # nodes (containers, tensors, scalars, None) in a tree, on save and on load

_C = TypeVar("_C", bound=type)
_TYPES: dict[str, type] = {}  # stored name -> class; the only classes load() ever builds
_NAMES: dict[type, str] = {}  # class -> the name save() records
_COMPLEX_NAMES = {str(d).removeprefix("torch."): d for d in tf.COMPLEX}

_SCALARS = (bool, int, float, str)

_NEWER = "It has format version {version}, written by a newer looplib; upgrade looplib to load it."
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
_TOO_LARGE = (
    "{func}(obj): obj is too large for one checkpoint: {what}, and load() refuses more (it bounds "
    "the work a file can ask of it). Keep large data in tensors, or split the tree over files."
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


def _plain_tensor(func: str, arg: str, where: str, t: torch.Tensor) -> torch.Tensor:
    problem = ""
    if t.layout is not torch.strided:
        problem = f"must be a dense tensor, got layout {t.layout}. Convert it with .to_dense()."
    elif t.is_quantized:
        problem = "must not be quantized. Store t.dequantize() or its int_repr() and scales."
    elif t.device.type == "meta":
        problem = "must hold data, got a tensor on the meta device. Materialize it first."
    elif t.dtype not in tf.STORAGE and t.dtype not in tf.COMPLEX:
        known = sorted(str(d).removeprefix("torch.") for d in (*tf.STORAGE, *tf.COMPLEX))
        problem = (
            f"must have a dtype a safetensors file can hold, one of {known}, got {t.dtype}. "
            "Convert it (e.g. t.float()) or store its bits with t.view(torch.uint8)."
        )
    elif any(n is not None for n in getattr(t, "names", None) or ()):
        problem = "must not have named dimensions. Drop them with t.rename(None)."
    if problem:
        raise TypeError(f"{func}({arg}): {where} {problem}")
    return t.detach().resolve_conj().resolve_neg().to("cpu").contiguous()


class _Encoder:
    """Turns a pytree into a JSON-able node, collecting its tensors under their path names."""

    def __init__(self, func: str) -> None:
        self.func = func
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self._taken = {"__metadata__"}  # safetensors reserves this name
        self._suffix: dict[str, int] = {}
        self._open: set[int] = set()  # containers on the current path, to catch cycles
        self.nodes = 0

    def _name(self, path: tuple[str, ...]) -> str:
        base = ".".join(path) if path else "obj"
        name = base
        while name in self._taken:
            self._suffix[base] = self._suffix.get(base, 1) + 1
            name = f"{base}#{self._suffix[base]}"
        self._taken.add(name)
        return name

    def encode(self, x: Any, where: str, path: tuple[str, ...]) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            what = f"its tree has more than {MAX_NODES} nodes"
            raise ValueError(_TOO_LARGE.format(func=self.func, what=what))
        if x is None or type(x) in _SCALARS:
            return x
        if isinstance(x, torch.Tensor):
            t = _plain_tensor(self.func, "obj", where, x)
            name = self._name(path)
            self.tensors.append((name, t))
            if t.dtype in tf.COMPLEX:
                return {"tensor": name, "dtype": str(t.dtype).removeprefix("torch.")}
            return {"tensor": name}
        if id(x) in self._open:
            raise ValueError(f"{self.func}(obj): {where} contains itself; a tree has no cycles.")
        if len(path) >= MAX_DEPTH:
            raise ValueError(
                f"{self.func}(obj): {where} is nested more than {MAX_DEPTH} containers deep, "
                "and load() refuses deeper trees. Flatten the tree."
            )
        self._open.add(id(x))
        try:
            return self._container(x, where, path)
        finally:
            self._open.discard(id(x))

    def _container(self, x: Any, where: str, path: tuple[str, ...]) -> Any:
        kind = type(x)
        if kind is list or kind is tuple:
            items = [self.encode(v, f"{where}[{i}]", (*path, str(i))) for i, v in enumerate(x)]
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
                pairs.append([k, self.encode(v, f"{where}[{k!r}]", (*path, k))])
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
            values = [self.encode(getattr(x, f), f"{where}.{f}", (*path, f)) for f in fields]
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
# Writing


def _as_path(func: str, path: Any, arg: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        fail(func, arg, "must be a str or os.PathLike", path, exc=TypeError)
    return Path(path)


def _check_target(func: str, path: Path) -> None:
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


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _save(func: str, obj: Any, path: Path, extra: Any) -> Path:
    encoder = _Encoder(func)
    tree = encoder.encode(obj, "obj", ())
    _check_extra(func, extra, "extra")
    _check_target(func, path)
    stored = [(name, tf.storage_tensor(t)) for name, t in encoder.tensors]
    ordered, entries = tf.layout(stored)
    rest = _dumps({"version": str(VERSION), "tree": _dumps(tree), "extra": _dumps(extra)})[1:-1]
    data_len = sum(t.numel() * t.element_size() for _, t in stored)
    # The size field has a fixed width, so the header's length does not depend on its value.
    length = len(tf.header_bytes(tf.checkpoint_metadata(0, rest), entries))
    header = tf.header_bytes(tf.checkpoint_metadata(8 + length + data_len, rest), entries)
    if len(stored) > tf.MAX_TENSORS:
        raise ValueError(_TOO_LARGE.format(func=func, what=f"it has {len(stored)} tensors"))
    if len(header) > tf.MAX_HEADER_BYTES:
        what = f"its header would have {len(header)} bytes"
        raise ValueError(_TOO_LARGE.format(func=func, what=what))
    if tf.count_items(header.decode("ascii")) > tf.MAX_JSON_ITEMS:
        what = f"its header would hold over {tf.MAX_JSON_ITEMS} JSON values"
        raise ValueError(_TOO_LARGE.format(func=func, what=what))
    tf.atomic_write(path, lambda f: tf.write_file(f, header, ordered, digest=True))
    return path


def save(obj: Any, path: str | os.PathLike[str], *, extra: Any = None) -> Path:
    """Write the pytree ``obj`` and JSON metadata ``extra`` to ``path``, atomically and durably.

    The file is a safetensors file (see the module docstring for the names and metadata), written
    to a temporary sibling, flushed and fsynced, renamed over ``path`` with ``os.replace``, and the
    directory is fsynced. So when ``save`` returns, ``path`` holds the whole checkpoint; when it
    raises (an error, a full disk, an interrupt), ``path`` holds what it held before and no
    temporary file is left. Everything is checked before the first byte is written.

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
        >>> from safetensors.torch import load_file
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = save({"w": torch.ones(2)}, f"{d}/state.safetensors", extra={"epoch": 3})
        ...     load_with_extra(p), load_file(p)
        (({'w': tensor([1., 1.])}, {'epoch': 3}), {'w': tensor([1., 1.])})
    """
    return _save("save", obj, _as_path("save", path), extra)


def export(state: TrainState, path: str | os.PathLike[str]) -> Path:
    """Write the model's weights in ``state`` as a plain safetensors file, for ``load_state_dict``.

    The file holds ``state.params`` and ``state.buffers`` under their module names (the names of
    ``named_parameters()`` and ``named_buffers()``), so
    ``model.load_state_dict(safetensors.torch.load_file(path))`` loads them into a fresh module.
    Its metadata is ``{"format": "pt"}``; it has no optimizer state, step or metrics (resume
    from :func:`save` files). Written atomically, as :func:`save` writes.

    ``named_parameters()`` names a tied parameter once and ``named_buffers()`` includes
    non-persistent buffers, while ``state_dict()`` does the reverse; load such a module's file
    with ``load_state_dict(..., strict=False)``.

    Args:
        state: a ``TrainState`` (from :func:`init`, or a checkpoint).
        path: the file to write; its directory must exist.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Example:
        >>> import tempfile, torch, looplib as ll
        >>> from safetensors.torch import load_file
        >>> model = torch.nn.Linear(2, 1)
        >>> state = ll.init(model, ll.optim.sgd(0.1))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     model.load_state_dict(load_file(export(state, f"{d}/model.safetensors")))
        <All keys matched successfully>
    """
    func = "export"
    target = _as_path(func, path)
    train_state(func, state)
    tensors: list[tuple[str, torch.Tensor]] = []
    seen: dict[str, str] = {}
    for field in ("params", "buffers"):
        group = getattr(state, field)
        if type(group) is not dict:
            fail(func, "state", f"must have a dict in state.{field}", group, exc=TypeError)
        for name, t in group.items():
            where = f"state.{field}[{name!r}]"
            if type(name) is not str or name == "__metadata__" or name in seen:
                rule = "must name each tensor once, by a module name"
                fix = f"{where} repeats state.{seen[name]}[{name!r}]." if name in seen else ""
                fail(func, "state", rule, name, fix)
            if not isinstance(t, torch.Tensor):
                fail(func, "state", f"must hold tensors in {where}", t, exc=TypeError)
            plain = _plain_tensor(func, "state", where, t)
            if plain.dtype in tf.COMPLEX:
                raise TypeError(
                    f"export(state): {where} must be real, got {plain.dtype}; a plain "
                    "safetensors file has no complex dtype every reader knows. Use save()."
                )
            seen[name] = field
            tensors.append((name, plain))
    _check_target(func, target)
    ordered, entries = tf.layout(tensors)
    header = tf.header_bytes('"format":"pt"', entries)
    tf.atomic_write(target, lambda f: tf.write_file(f, header, ordered, digest=False))
    return target


# ---------------------------------------------------------------------------------------------
# Reading


class _Decoder:
    """Rebuilds a tree from its JSON node; NamedTuples come only from the registry.

    Tensors are allocated (on ``device``) as their nodes are met; their bytes are read once the
    whole tree has been checked.
    """

    def __init__(self, reader: tf.Reader, header: tf.Header, device: torch.device) -> None:
        self.reader = reader
        self.entries = header.entries
        self.device = device
        self.tensors: dict[str, torch.Tensor] = {}
        self.nodes = 0

    def decode(self, node: Any, where: str, depth: int = 0) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self.reader.malformed(f"a tree of more than {MAX_NODES} nodes")
        if node is None or type(node) in _SCALARS:
            return node
        if type(node) is not dict:
            self.reader.malformed(f"node {describe(node)} at {where}")
        if depth > MAX_DEPTH:
            self.reader.malformed(f"a tree nested more than {MAX_DEPTH} deep at {where}")
        keys = sorted(node)
        if keys in (["tensor"], ["dtype", "tensor"]):
            return self._tensor(node, where)
        if keys in (["list"], ["tuple"]) and type(node[keys[0]]) is list:
            items = [
                self.decode(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node[keys[0]])
            ]
            return items if keys == ["list"] else tuple(items)
        if keys in (["dict"], ["ordereddict"]) and type(node[keys[0]]) is list:
            out: dict[str, Any] = {} if keys == ["dict"] else OrderedDict()
            for pair in node[keys[0]]:
                if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str:
                    self.reader.malformed(f"dict entry {describe(pair)} at {where}")
                if pair[0] in out:
                    self.reader.malformed(f"dict key {pair[0]!r} repeated at {where}")
                out[pair[0]] = self.decode(pair[1], f"{where}[{pair[0]!r}]", depth + 1)
            return out
        if keys == ["fields", "namedtuple", "values"]:
            return self._namedtuple(node, where, depth)
        self.reader.malformed(f"node {describe(node)} at {where}")

    def _tensor(self, node: dict[str, Any], where: str) -> torch.Tensor:
        name = node["tensor"]
        if type(name) is not str or name not in self.entries:
            self.reader.malformed(f"tensor name {describe(name)} at {where}")
        if name in self.tensors:
            self.reader.malformed(f"tensor {name!r} used twice, again at {where}")
        entry = self.entries[name]
        dtype, shape = entry.dtype, entry.shape
        if "dtype" in node:
            logical = _COMPLEX_NAMES.get(node["dtype"]) if type(node["dtype"]) is str else None
            if logical is None or tf.COMPLEX[logical] != dtype or shape[-1:] != (2,):
                self.reader.malformed(f"complex tensor {name!r} at {where}")
            dtype, shape = logical, shape[:-1]
        t = torch.empty(shape, dtype=dtype, device=self.device)
        self.tensors[name] = t
        return t

    def _namedtuple(self, node: dict[str, Any], where: str, depth: int) -> Any:
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
        return cls(
            *(
                self.decode(v, f"{where}.{f}", depth + 1)
                for f, v in zip(fields, values, strict=True)
            )
        )

    def fill(self, data_start: int) -> None:
        """Read every tensor's bytes, in file order; all must have been met in the tree."""
        unused = self.entries.keys() - self.tensors.keys()
        if unused:
            self.reader.malformed(f"tensor {min(unused)[:200]!r} is not in the tree")
        if self.device.type == "meta":
            return
        items = [(self.entries[name], t) for name, t in self.tensors.items()]
        self.reader.read_tensors(data_start, sorted(items, key=lambda item: item[0].begin))


def _device(func: str, map_location: Any) -> torch.device:
    if isinstance(map_location, torch.device):
        return map_location
    if not isinstance(map_location, str):
        fail(func, "map_location", "must be a str or torch.device", map_location, exc=TypeError)
    try:
        return torch.device(map_location)
    except RuntimeError:
        fail(func, "map_location", "must name a device", map_location, "E.g. 'cpu' or 'cuda:0'.")


_METADATA_KEYS = ["extra", "format", "sha256", "size", "tree", "version"]


def _read(func: str, path: Path, device: torch.device) -> tuple[Any, Any]:
    with tf.Reader(func, path) as reader:
        header = reader.checkpoint_header()
        metadata = header.metadata
        version = metadata.get("version", "")
        if re.fullmatch(r"[1-9][0-9]{0,5}", version) is None:
            reader.malformed(f"version {version[:20]!r}")
        if int(version) > VERSION:
            reader.bad(f"must have format version <= {VERSION}", _NEWER.format(version=version))
        if int(version) < VERSION:  # version 1 was not a safetensors file
            reader.malformed(f"version {version!r}")
        if sorted(metadata) != _METADATA_KEYS:
            reader.malformed(f"metadata keys {sorted(metadata)[:10]}, not {_METADATA_KEYS}")
        tree = reader.parse_json(metadata["tree"], "tree")
        extra = reader.parse_json(metadata["extra"], "extra")
        decoder = _Decoder(reader, header, device)
        obj = decoder.decode(tree, "obj")
        decoder.fill(header.data_start)
    return obj, extra


def load_with_extra(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """Read a checkpoint written by :func:`save`: return ``(obj, extra)``.

    ``path`` must be a regular file (checked before it is opened; a pipe or device is refused,
    never read). The whole file is verified (marker, size, SHA-256 digest, version, every header
    field and the bounds on its size) before its tensors are read; nothing in it is unpickled or
    imported. A NamedTuple node is rebuilt only from a class registered with
    :func:`register_checkpoint_type`.

    Args:
        path: a file written by :func:`save`.
        map_location: the device for the loaded tensors.

    Returns:
        The tree as saved (same node types, dict order, dtypes, shapes and tensor bytes; tensors
        contiguous, on ``map_location``, not requiring grad) and the ``extra`` JSON data.

    Raises:
        FileNotFoundError: no file at ``path``.
        IsADirectoryError: ``path`` is a directory.
        ValueError: the file is not a regular file, truncated, corrupted, not a looplib
            checkpoint, malformed, from a newer looplib, or holds an unregistered NamedTuple
            type; the message says which.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = save([torch.tensor(7)], f"{d}/c.safetensors", extra={"history": [{"loss": 0.5}]})
        ...     load_with_extra(p)
        ([tensor(7)], {'history': [{'loss': 0.5}]})
    """
    func = "load_with_extra"
    return _read(func, _as_path(func, path), _device(func, map_location))


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
        ...     load(save((torch.zeros(1, dtype=torch.int64), None), f"{d}/c.safetensors"))
        (tensor([0]), None)
    """
    return _read("load", _as_path("load", path), _device("load", map_location))[0]
