"""Data-parallel training on ``torch.distributed``: ``pmean`` and the helpers an epoch loop needs.

Every rank runs the same pure step on its own shard of the data; :func:`pmean` (a gradient
stage, after JAX's ``lax.pmean``) averages the gradient over the ranks, weighted by each rank's
sample count, before it reaches clipping and the optimizer. Every rank then applies the same
update to the same state, so the ranks stay identical without ever exchanging parameters::

    dist.init_process_group("nccl", timeout=timedelta(minutes=5))   # or launch with torchrun
    state = broadcast_state(ll.init(model, opt))                      # identical start
    step = ll.chain(ll.accumulate(4), pmean(), ll.clip(1.0))(ll.train_step(model, loss, opt))
    state = ll.fold(step, state, shard(batches))                     # rank r: batches r, r+N, ...

Collectives block until every rank of the group joins them. A rank that dies or falls behind
leaves the others waiting until the process group's timeout, so pass ``timeout=`` to
``torch.distributed.init_process_group`` (a few minutes, or seconds in tests) instead of
relying on the default; the waiting ranks then raise instead of hanging. For the same reason
every rank must run the same number of steps: :func:`shard` gives every rank the same number of
batches, and :func:`agree` makes a stopping decision unanimous.

Without an initialised process group the helpers behave as a single process of a world of one
(``world() == (0, 1)``); only :func:`pmean` insists on a process group.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import optree
import torch
import torch.distributed as dist

from . import _overlap
from . import _validate as v
from ._step import ApplyFn, Backward, Micro, Stage
from ._transform import Transformer, stage_transformer
from ._tree import leaves_by_path
from ._types import Metrics, Params, Tensor, TrainState, describe

NOT_AVAILABLE = (
    "{func}: torch.distributed is not available in this build of PyTorch; install a build "
    "with distributed support (the standard Linux wheels have it)."
)
NOT_INITIALIZED = (
    "{func}: torch.distributed is not initialized; call "
    "torch.distributed.init_process_group(...) or launch with torchrun."
)
NOT_A_MEMBER = (
    "{func}: this process (global rank {rank}) is not a member of the process group it was "
    "given; call it only on the ranks passed to torch.distributed.new_group(...)."
)
GROUP_RULE = "must be None (the default process group) or a torch.distributed ProcessGroup"
STATE_FIELDS = ("params", "buffers", "opt_state", "step")


# ---------------------------------------------------------------------------------------------
# Where we are.


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_non_member(group: Any) -> bool:
    """``new_group`` returns this marker (an int) on the ranks it leaves out."""
    marker = dist.GroupMember.NON_GROUP_MEMBER
    return isinstance(group, type(marker)) and group == marker


def _check_group(func: str, group: Any) -> None:
    if group is None:
        return
    if dist.is_available() and _is_non_member(group):
        raise RuntimeError(NOT_A_MEMBER.format(func=f"{func}(group=...)", rank=dist.get_rank()))
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        v.fail(func, "group", GROUP_RULE, group, exc=TypeError)


def _require(func: str, group: Any) -> int:
    """The group's world size; raises when there is no process group or we are not in it."""
    if not dist.is_available():
        raise RuntimeError(NOT_AVAILABLE.format(func=func))
    if not dist.is_initialized():
        raise RuntimeError(NOT_INITIALIZED.format(func=func))
    size = dist.get_world_size(group)
    if size < 1:
        raise RuntimeError(NOT_A_MEMBER.format(func=func, rank=dist.get_rank()))
    return size


def world(group: Any = None) -> tuple[int, int]:
    """This process's ``(rank, world_size)``, or ``(0, 1)`` when not distributed.

    Args:
        group: a process group, or ``None`` for the default one.

    Returns:
        ``(dist.get_rank(group), dist.get_world_size(group))`` when a process group is
        initialised, else ``(0, 1)``.

    Example:
        >>> world()
        (0, 1)
    """
    _check_group("world", group)
    if not _active():
        return 0, 1
    size = _require("world()", group)
    return dist.get_rank(group), size


def is_main_process(group: Any = None) -> bool:
    """Whether this process is rank 0 (the one that logs and saves), ``True`` when not distributed.

    Example:
        >>> is_main_process()
        True
    """
    return world(group)[0] == 0


def _comm_device(group: Any, device: torch.device) -> torch.device:
    """Where a collective on a tensor living on ``device`` must run for this group's backend."""
    if device.type != "cuda" and str(dist.get_backend(group)) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


# ---------------------------------------------------------------------------------------------
# pmean: the gradient stage.


def _buckets(grads: Params) -> dict[tuple[torch.dtype, torch.device], list[str]]:
    """Parameter names grouped by the dtype their reduction runs in and by device.

    Half-precision gradients are reduced in float32: a sum of ``weight * grad`` over ranks
    overflows float16 and loses most of its digits in bfloat16.
    """
    buckets: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for name, g in grads.items():
        dtype = torch.promote_types(g.dtype, torch.float32)
        buckets.setdefault((dtype, g.device), []).append(name)
    return buckets


def _weighted_mean(
    grads: Params, weight: Tensor, metrics: Metrics, group: Any
) -> tuple[Params, Tensor, Metrics]:
    """``(sum_r w_r g_r / sum_r w_r, sum_r w_r, sum_r w_r m_r / sum_r w_r)`` over the ranks.

    One ``all_reduce`` per (dtype, device) bucket; the weight and the metrics ride at the end of
    the widest real-valued bucket, which is reduced first so the others can be divided as they
    arrive.
    """
    buckets = _buckets(grads)
    real = [key for key in buckets if not key[0].is_complex]
    host = max(real, key=lambda key: torch.finfo(key[0]).bits) if real else None
    order = sorted(buckets, key=lambda key: key != host)
    names = list(metrics)
    total: Tensor | None = None
    reduced: Metrics = {}
    if host is None:  # no real-valued gradient: the weight and metrics travel on their own
        comm = _comm_device(group, weight.device)
        w = weight.to(device=comm, dtype=torch.float64)
        extra = torch.stack([w, *(metrics[n].to(comm, torch.float64) * w for n in names)])
        dist.all_reduce(extra, op=dist.ReduceOp.SUM, group=group)
        total = extra[0]
        reduced = {n: extra[1 + i] / total for i, n in enumerate(names)}
    out: dict[str, Tensor] = {}
    for key in order:
        dtype, device = key
        bucket = buckets[key]
        comm = _comm_device(group, device)
        w = weight.to(device=comm, dtype=dtype, non_blocking=True)
        parts = [(grads[n].to(device=comm, dtype=dtype) * w).reshape(-1) for n in bucket]
        if key == host:
            parts.append(w.reshape(1))
            parts.extend((metrics[n].to(device=comm, dtype=dtype) * w).reshape(1) for n in names)
        buffer = torch.cat(parts)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        if key == host:
            tail = len(names) + 1
            buffer, extra = buffer[:-tail], buffer[-tail:]
            total = extra[0]
            reduced = {n: extra[1 + i] / total for i, n in enumerate(names)}
        assert total is not None
        mean = buffer / total.to(device=comm, dtype=buffer.real.dtype)
        pieces = mean.split([grads[n].numel() for n in bucket])
        for n, piece in zip(bucket, pieces, strict=True):
            g = grads[n]
            out[n] = piece.view(g.shape).to(device=g.device, dtype=g.dtype)
    assert total is not None
    metrics_out = {
        n: reduced[n].to(device=metrics[n].device, dtype=metrics[n].dtype) for n in names
    }
    return (
        {n: out[n] for n in grads},
        total.to(device=weight.device, dtype=weight.dtype),
        metrics_out,
    )


def pmean(group: Any = None, *, bucket_mb: float = 25.0, overlap: bool = True) -> Transformer:
    """Average the gradient over the ranks of a process group, weighted by each rank's weight.

    Each rank ``r`` holds the mean gradient ``g_r`` of its ``w_r`` samples (or tokens: the
    ``weight`` that the loss or ``accumulate`` reports). ``pmean`` replaces it, on every rank,
    by the mean gradient of all the ranks' samples together::

        g = all_reduce_sum(w_r * g_r) / all_reduce_sum(w_r)        # and the weight: sum(w_r)

    so N ranks with B samples each take exactly the update of one process on the N*B samples,
    and ranks with unequal batches stay exact (a plain mean of the ``g_r`` would not). The
    products ``w_r * g_r`` of all parameters are flattened into one buffer per dtype and device,
    with the weight riding in one of them, so a model in one dtype costs one ``all_reduce`` per
    call. The loss-side metrics (``loss`` and the loss's own) ride in the same buffer, averaged
    by the same weights, so every rank's ``state.metrics["loss"]`` is the whole batch's loss.
    Half-precision gradients are summed in float32. The incoming gradients are never
    modified, and there is no host synchronisation.

    Where it stands in a chain decides how often it communicates: in
    ``chain(accumulate(K), pmean(), clip(c))`` it runs once per optimizer update, on the
    accumulated gradient (and ``clip`` then sees the global gradient, so every rank clips
    alike); in ``chain(pmean(), accumulate(K))`` it communicates on every micro-batch, K times
    as often, for the same result. Put it before ``clip`` and ``track_norm`` so that they act on
    the global gradient.

    With ``overlap`` (the default) the reduction runs while the backward pass still runs, as
    DDP's does: the parameters are cut into buckets of about ``bucket_mb`` megabytes, in reverse
    order, and each bucket's ``all_reduce`` is launched asynchronously as soon as the backward
    pass has produced all its gradients; ``pmean``'s place in the chain waits for them. Under
    ``accumulate(K)`` the window's closing micro-batch launches them, each bucket holding the
    window's weighted sum (``accumulate``'s running sum plus this micro-batch's ``w * g``), so
    it still communicates once per update. The results are those of the plain reduction: bit
    for bit without ``accumulate`` on two ranks (the same products, summed elementwise; with
    more ranks the summation order inside the all-reduce may depend on the buffer's layout);
    under ``accumulate`` the plain reduction sends the window's mean times its weight, the
    overlapped one the window's sum itself, which can differ in the last bit. The reduction is
    not overlapped (it runs after the backward pass, as with ``overlap=False``) when
    ``pmean`` is compiled (``ll.compile`` puts the collectives in the graph, where the
    compiler schedules them), under ``ll.vmap``, when a stage other than ``accumulate`` comes
    before it in the chain (``clip``, ``skip_nonfinite``, ...), when the window's position is
    not known in Python (a lone ``step(state, batch)`` call with ``accumulate``, or
    ``skip_nonfinite`` before it), and when no gradient is real-valued.

    Every rank of the group must call the step the same number of times (see :func:`shard` and
    :func:`agree`); a rank that stops early leaves the others waiting until the process group's
    ``timeout``. With a group of one rank ``pmean`` is the identity and communicates nothing.

    Args:
        group: the process group to average over; ``None`` means the default group. The
            process group must be initialised (``torch.distributed.init_process_group``, or a
            ``torchrun`` launch) by the time the step first runs, not when ``pmean`` is built.
        bucket_mb: the size of one overlapped all-reduce, in megabytes (2**20 bytes, counted
            in the reduction dtype), a positive number; a parameter larger than that gets a
            bucket of its own. Smaller buckets start communicating earlier, at more calls.
        overlap: whether to overlap the reduction with the backward pass (see above); with
            ``False`` one ``all_reduce`` per dtype runs once the whole gradient exists.

    Returns:
        a transformer with no state slot.

    Raises:
        RuntimeError: when the step runs and torch.distributed is unavailable or not
            initialised, or this process is not in ``group``.

    Example:
        >>> import looplib as ll
        >>> ll.chain(ll.accumulate(4), pmean(), ll.clip(1.0))
        chain(accumulate(4), pmean(), clip(1.0))
    """
    if not dist.is_available():
        raise RuntimeError(NOT_AVAILABLE.format(func="pmean()"))
    _check_group("pmean", group)
    bucket_mb = v.positive("pmean", "bucket_mb", bucket_mb)
    if not isinstance(overlap, bool):
        v.fail("pmean", "overlap", "must be a bool", overlap, exc=TypeError)
    options = [] if group is None else [f"group={type(group).__name__}"]
    if bucket_mb != 25.0:
        options.append(f"bucket_mb={bucket_mb:g}")
    if not overlap:
        options.append("overlap=False")
    name = f"pmean({', '.join(options)})"
    bucket_bytes = max(1, int(bucket_mb * _overlap.MB))
    pending = _overlap.Pending()

    def comm(device: torch.device) -> torch.device:
        return _comm_device(group, device)

    def before_backward(backward: Backward) -> Callable[[], None] | None:
        pending.put(None)
        if _require(name, group) == 1:
            return None
        inflight = _overlap.start(backward, bucket_bytes, group, comm)
        pending.put(inflight)
        return None if inflight is None else inflight.done

    def wrap(inner: ApplyFn) -> ApplyFn:
        def apply(state: TrainState, micro: Micro) -> TrainState:
            if _require(name, group) == 1:
                return inner(state, micro)
            inflight = pending.take(state)
            if inflight is not None:
                grads, weight, metrics = inflight.result(micro.grads, micro.weight, micro.metrics)
            else:
                grads, weight, metrics = _weighted_mean(
                    micro.grads, micro.weight, micro.metrics, group
                )
            return inner(
                state, micro._replace(grads=grads, weight=weight, metrics=metrics, norms=None)
            )

        return apply

    return stage_transformer(Stage(name, wrap, overlap=before_backward if overlap else None))


# ---------------------------------------------------------------------------------------------
# The epoch loop's helpers.


def shard(batches: Sequence[Any], rank: int | None = None, world_size: int | None = None) -> list:
    """The batches this rank trains on: ``batches[rank::world_size]``, cut to equal counts.

    Rank ``r`` of ``N`` takes batches ``r, r + N, r + 2N, ...`` of the first
    ``(len(batches) // N) * N``; the last ``len(batches) % N`` batches (fewer than ``N``) are
    dropped, so that every rank gets exactly ``len(batches) // N`` batches and runs the same
    number of steps (an extra step on one rank would wait forever for the others in
    :func:`pmean`). Dropping is chosen over padding because a padded batch would be trained on
    twice in one epoch. Shuffle the sequence the same way on every rank (same seed) before
    sharding, to vary which batches are dropped.

    Args:
        batches: a sequence (``len`` and indexing); materialise a loader with ``list(...)``.
        rank: this rank; ``None`` (with ``world_size=None``) reads :func:`world`.
        world_size: the number of ranks; give both or neither.

    Returns:
        a new list of ``len(batches) // world_size`` batches.

    Example:
        >>> shard(list("abcdefg"), rank=1, world_size=3)
        ['b', 'e']
        >>> shard(list("abc"))        # not distributed: everything
        ['a', 'b', 'c']
    """
    if not isinstance(batches, Sequence):
        v.fail(
            "shard",
            "batches",
            "must be a sequence (with len and indexing)",
            batches,
            fix="Materialise an iterable with list(...), or use a DistributedSampler.",
            exc=TypeError,
        )
    if (rank is None) != (world_size is None):
        v.fail(
            "shard",
            "rank" if world_size is None else "world_size",
            "must be given together with the other of rank and world_size",
            None,
            fix="Pass both, or neither to read them from the process group.",
        )
    if rank is None or world_size is None:
        rank, world_size = world()
    world_size = v.positive_int("shard", "world_size", world_size)
    rank = v.nonnegative_int("shard", "rank", rank)
    if rank >= world_size:
        v.fail("shard", "rank", f"must be less than world_size={world_size}", rank)
    kept = len(batches) // world_size * world_size
    return [batches[i] for i in range(rank, kept, world_size)]


def _paths(state: TrainState, fields: Sequence[str]) -> dict[str, Any]:
    """``{"state.params['0.weight']": leaf, ...}`` for the chosen fields of the state."""
    paths: dict[str, Any] = {}
    for f in fields:
        paths.update(leaves_by_path(getattr(state, f), f"state.{f}"))
    return paths


def _signature(paths: Mapping[str, Any]) -> dict[str, str]:
    return {
        path: describe(leaf) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
        for path, leaf in paths.items()
    }


def _same_structure(func: str, signature: dict[str, str], group: Any, size: int) -> None:
    """Raise on every rank if the ranks' states differ in structure, shapes or dtypes."""
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, signature, group=group)
    mine = gathered[0]
    for r, theirs in enumerate(gathered[1:], start=1):
        if theirs == mine:
            continue
        for path in sorted(set(mine) | set(theirs)):
            a, b = mine.get(path, "nothing"), theirs.get(path, "nothing")
            if a != b:
                raise ValueError(
                    f"{func}: the ranks' states differ in structure at {path}: rank 0 has {a}, "
                    f"rank {r} has {b}. Every rank must build its state the same way "
                    "(same model, optimizer and transformers)."
                )


def broadcast_state(state: TrainState, src: int = 0, *, group: Any = None) -> TrainState:
    """Rank ``src``'s state, on every rank: the way to make every rank start identical.

    Every tensor of the state (params, buffers, optimizer state, step, metrics, slots) is
    copied from rank ``src``; tensors are flattened into one buffer per dtype and device, so this
    costs one ``broadcast`` per dtype, plus one small exchange that checks first that all ranks
    hold states of the same structure (raising a ``ValueError`` naming the first path that
    differs, rather than exchanging mismatched buffers). Call it once, after ``ll.init`` and
    before training; every rank of the group must call it.

    Args:
        state: this rank's state.
        src: the rank (in ``group``) whose state every rank receives.
        group: a process group, or ``None`` for the default one.

    Returns:
        a new state; the input is not modified. Not distributed: ``state`` itself.

    Example:
        >>> import looplib as ll
        >>> state = ll.init(torch.nn.Linear(2, 1), ll.optim.sgd(lr=0.1))
        >>> broadcast_state(state) is state       # a world of one
        True
    """
    _check_group("broadcast_state", group)
    if not isinstance(state, TrainState):
        v.fail(
            "broadcast_state",
            "state",
            "must be a looplib TrainState (from ll.init)",
            state,
            exc=TypeError,
        )
    src = v.nonnegative_int("broadcast_state", "src", src)
    _, size = world(group)
    if src >= size:
        v.fail("broadcast_state", "src", f"must be a rank less than the world size {size}", src)
    if size == 1:
        return state
    signature = _signature(_paths(state, TrainState._fields))
    _same_structure("broadcast_state(state)", signature, group, size)
    tree: Any = state
    leaves: list[Any]
    leaves, spec = optree.tree_flatten(tree)
    tensors = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i in tensors:
        buckets.setdefault((leaves[i].dtype, leaves[i].device), []).append(i)
    src_global = dist.get_global_rank(group, src) if group is not None else src
    new = list(leaves)
    for (dtype, device), index in buckets.items():
        comm = _comm_device(group, device)
        as_bytes = dtype == torch.bool
        flat = [leaves[i].detach().reshape(-1).to(comm) for i in index]
        if as_bytes:
            flat = [f.to(torch.uint8) for f in flat]
        buffer = torch.cat(flat) if flat else torch.empty(0, device=comm)
        dist.broadcast(buffer, src=src_global, group=group)
        if as_bytes:
            buffer = buffer.to(torch.bool)
        pieces = buffer.to(device).split([leaves[i].numel() for i in index])
        for i, piece in zip(index, pieces, strict=True):
            new[i] = piece.view(leaves[i].shape).clone()  # standalone tensors, not views
    return cast(TrainState, optree.tree_unflatten(spec, new))


def _fingerprint(t: Tensor) -> Tensor:
    """A position-sensitive checksum of a tensor's bits, as a 0-d int64 tensor (bitwise: -0.0
    and 0.0 differ, equal NaNs agree)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=t.device)
    nbytes = flat.numel() * flat.element_size()
    bits = flat.view(torch.int32) if nbytes % 4 == 0 else flat.view(torch.uint8)
    bits = bits.to(torch.int64)
    position = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
    mixed = bits * (position * 2654435761 + 97531)  # wraps around modulo 2**64, on purpose
    return mixed.sum() ^ bits.sum()


def check_same_state(
    state: TrainState, *, fields: Sequence[str] = STATE_FIELDS, group: Any = None
) -> None:
    """Raise unless every rank holds bit-for-bit the same state.

    Each rank computes a checksum of every tensor of the chosen fields; the checksums are
    all-gathered (one small collective, plus one that compares the structures first), and a
    ``ValueError`` naming the first differing path, e.g. ``state.params['0.weight']``, is raised
    on every rank. Use it after :func:`broadcast_state` and at the end of training to catch a
    missing :func:`pmean` or a rank that saw different data in a non-data-parallel way.

    ``metrics`` and ``slots`` are left out by default: they hold per-rank values by design (the
    local loss; ``accumulate``'s partial sums before ``pmean``). ``buffers`` such as BatchNorm's
    running statistics are computed from each rank's own batches and drift apart unless
    synchronised; pass ``fields=("params", "opt_state", "step")`` to skip them.

    Args:
        state: this rank's state.
        fields: the ``TrainState`` fields to compare.
        group: a process group, or ``None`` for the default one.

    Returns:
        ``None``. Not distributed: nothing to compare, returns at once.

    Raises:
        ValueError: naming the first path whose value (or structure) differs across ranks.

    Example:
        >>> import looplib as ll
        >>> check_same_state(ll.init(torch.nn.Linear(2, 1), ll.optim.sgd(lr=0.1)))
    """
    _check_group("check_same_state", group)
    if not isinstance(state, TrainState):
        v.fail(
            "check_same_state",
            "state",
            "must be a looplib TrainState (from ll.init)",
            state,
            exc=TypeError,
        )
    if isinstance(fields, str) or not all(f in TrainState._fields for f in fields):
        v.fail(
            "check_same_state",
            "fields",
            f"must be a sequence of TrainState fields from {list(TrainState._fields)}",
            fields,
        )
    fields = tuple(fields)
    _, size = world(group)
    if size == 1:
        return
    func = "check_same_state(state)"
    paths = _paths(state, fields)
    _same_structure(func, _signature(paths), group, size)
    named = [(p, x) for p, x in paths.items() if isinstance(x, torch.Tensor)]
    if not named:
        return
    device = _comm_device(group, named[0][1].device)
    sums = torch.stack([_fingerprint(x).to(device) for _, x in named])
    gathered = [torch.empty_like(sums) for _ in range(size)]
    dist.all_gather(gathered, sums, group=group)
    table = torch.stack(gathered).cpu()
    differs = (table != table[0]).any(dim=0)
    if bool(differs.any()):
        i = int(differs.nonzero()[0, 0])
        ranks = [r for r in range(size) if table[r, i] != table[0, i]]
        raise ValueError(
            f"{func}: {named[i][0]} differs across ranks (rank 0 disagrees with rank(s) "
            f"{ranks}); data-parallel ranks must hold the same state. Start every rank from "
            "broadcast_state(state) and average the gradient with pmean() in the step's chain."
        )


def _number(func: str, arg: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().reshape(()).item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    v.fail(func, arg, "must be a real number or a one-element tensor", value, exc=TypeError)


def all_reduce_metrics(
    sums: Mapping[str, Any], weight: Any, *, group: Any = None
) -> dict[str, float]:
    """The weighted mean of per-rank metric sums over all ranks, identical on every rank.

    Each rank passes ``sums[k] = sum_i w_i * m_i[k]`` over its batches (the metric weighted by
    each batch's weight) and ``weight = sum_i w_i``; the result is::

        {k: sum_over_ranks(sums[k]) / sum_over_ranks(weight) for k in sums}

    computed in float64 with one ``all_reduce`` (after a check that every rank reports the same
    metric names), so every rank records the same history and takes the same decisions on it.
    A total weight of zero gives NaN.

    Args:
        sums: metric name to this rank's weighted sum (a float or one-element tensor).
        weight: this rank's total weight (a float or one-element tensor).
        group: a process group, or ``None`` for the default one.

    Returns:
        a new dict of Python floats, keyed like ``sums``.

    Example:
        >>> all_reduce_metrics({"loss": 6.0, "acc": 3.0}, 4)    # a world of one
        {'loss': 1.5, 'acc': 0.75}
    """
    _check_group("all_reduce_metrics", group)
    if not isinstance(sums, Mapping):
        v.fail(
            "all_reduce_metrics",
            "sums",
            "must be a dict of metric name to weighted sum",
            sums,
            exc=TypeError,
        )
    keys = list(sums)
    values = [_number("all_reduce_metrics", f"sums[{k!r}]", sums[k]) for k in keys]
    total = _number("all_reduce_metrics", "weight", weight)
    _, size = world(group)
    if size > 1:
        gathered: list[Any] = [None] * size
        dist.all_gather_object(gathered, sorted(keys), group=group)
        for r, theirs in enumerate(gathered):
            if theirs != gathered[0]:
                raise ValueError(
                    f"all_reduce_metrics(sums=...): every rank must report the same metric "
                    f"names; rank 0 has {gathered[0]}, rank {r} has {theirs}."
                )
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        device = _comm_device(group, torch.device("cpu"))
        buffer = torch.tensor(
            [values[i] for i in order] + [total], dtype=torch.float64, device=device
        )
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        reduced = buffer.tolist()
        total = reduced[-1]
        for j, i in enumerate(order):
            values[i] = reduced[j]
    return {k: (s / total if total != 0 else math.nan) for k, s in zip(keys, values, strict=True)}


def agree(flag: bool, *, group: Any = None) -> bool:
    """``True`` on every rank if ``flag`` is ``True`` on any rank: a unanimous stop decision.

    The epoch loop asks each rank whether to stop (early stopping on a metric, a time budget,
    a NaN loss); if one rank stopped alone the others would wait for it forever. This is an
    ``all_reduce`` with ``MAX`` of the flags.

    Args:
        flag: this rank's decision, a bool.
        group: a process group, or ``None`` for the default one.

    Returns:
        whether any rank's ``flag`` is ``True``; ``flag`` itself when not distributed.

    Example:
        >>> agree(True), agree(False)
        (True, False)
    """
    _check_group("agree", group)
    if not isinstance(flag, bool):
        v.fail("agree", "flag", "must be a bool", flag, exc=TypeError)
    _, size = world(group)
    if size == 1:
        return flag
    device = _comm_device(group, torch.device("cpu"))
    vote = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=group)
    return bool(vote.item())
