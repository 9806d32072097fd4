"""``pmean``'s all-reduce overlapped with the backward pass: buckets launched from grad hooks.

Just before the backward pass of a micro-batch that communicates, :func:`start` registers a
hook on every parameter's leaf. The parameters are cut into buckets of about ``bucket_bytes``
each, in reverse order (the backward pass produces the last layers' gradients first), one
reduction dtype and device per bucket. When a bucket's last gradient arrives, its buffer
``[w * g for each parameter]`` is built and its ``all_reduce`` launched asynchronously, while
autograd goes on with the earlier layers. ``pmean``'s ``apply`` then waits for the buffers and
unpacks them, exactly as the plain reduction does::

    for bucket in buckets:                       # in a fixed order, the same on every rank
        when every gradient of bucket is ready:
            work[bucket] = all_reduce(cat(w * g for g in bucket), async_op=True)
    ...                                          # the backward pass ends
    grads = [wait(work[b]) / total_weight for b in buckets]   # in pmean's apply

Under ``accumulate(K)`` placed before ``pmean`` only the window's closing micro-batch
communicates, and its bucket holds the window's weighted sum: ``s + w * g``, where ``s`` is the
running sum in the ``accumulate`` slot (the same sum ``accumulate`` computes). The weight and
the loss-side metrics are known after the forward pass; they ride at the end of the last bucket
of the widest real dtype, as in the plain reduction.

Buckets are launched in their fixed order on every rank (a bucket whose gradients are ready
waits for the buckets before it), so the ranks' collectives always pair up, whatever order the
hooks fire in. A parameter that gets no gradient (unused in the loss) holds its bucket, and
those after it, until the backward pass returns; they are then launched with zeros for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ._accumulate import SLOT as ACCUMULATE_SLOT
from ._accumulate import AccumulateState
from ._step import Backward
from ._types import Metrics, Params, Tensor, TrainState

MB = 2**20
"""Bytes in one of ``pmean(bucket_mb=...)``'s megabytes (as DDP's ``bucket_cap_mb``)."""


class Bucket(NamedTuple):
    """Parameters reduced in one ``all_reduce``: indices into the state's parameters (in the
    buffer's order), the reduction dtype, the parameters' device and the collective's device;
    ``host``: the weight and metrics ride at its end."""

    params: list[int]
    dtype: torch.dtype
    device: torch.device
    comm: torch.device
    host: bool


def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision gradients are summed in float32 (as in the plain reduction)."""
    return torch.promote_types(dtype, torch.float32)


def plan(
    leaves: list[Tensor], bucket_bytes: int, comm: Callable[[torch.device], torch.device]
) -> list[Bucket] | None:
    """The buckets, in launch order; ``None`` when no gradient is real-valued (the weight would
    have no bucket to ride in).

    Parameters are taken in reverse order; each (dtype, device) fills its own open bucket, which
    is closed when the next parameter would take it past ``bucket_bytes`` (a bucket holds at
    least one parameter). Buckets are launched in the order the backward pass completes them
    (by their earliest parameter, latest first); the host bucket is the last one of the widest
    real dtype.
    """
    open_: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    size: dict[tuple[torch.dtype, torch.device], int] = {}
    closed: list[tuple[tuple[torch.dtype, torch.device], list[int]]] = []
    for i in reversed(range(len(leaves))):
        key = (reduction_dtype(leaves[i].dtype), leaves[i].device)
        nbytes = leaves[i].numel() * key[0].itemsize
        if key in open_ and size[key] + nbytes > bucket_bytes:
            closed.append((key, open_.pop(key)))
        if key not in open_:
            open_[key], size[key] = [], 0
        open_[key].append(i)
        size[key] += nbytes
    closed.extend(open_.items())
    # Launch order: the bucket whose earliest parameter comes latest is complete first.
    closed.sort(key=lambda bucket: -min(bucket[1]))
    real = [key for key, _ in closed if not key[0].is_complex]
    if not real:
        return None
    widest = max(key[0].itemsize for key in real)
    host = max(
        (n for n, (key, _) in enumerate(closed) if not key[0].is_complex),
        key=lambda n: (closed[n][0][0].itemsize == widest, n),
    )
    return [
        Bucket(sorted(index), dtype, device, comm(device), n == host)
        for n, ((dtype, device), index) in enumerate(closed)
    ]


def window(backward: Backward) -> tuple[bool, AccumulateState | None]:
    """Whether this micro-batch can overlap its reduction, and the accumulation window's sums to
    add to its gradient (``None``: none).

    It can when the stages in front of ``pmean`` leave the gradient as autograd made it, except
    for ``accumulate``, and then only on the window's closing micro-batch at a position known
    in Python (the other micro-batches do not communicate at all).
    """
    sums: AccumulateState | None = None
    for stage in backward.before:
        if stage.slot != ACCUMULATE_SLOT:
            return False, None  # a stage that changes the gradient first (clip, skip, ...)
        if stage.window == 1:
            continue  # accumulate(1): the identity
        if backward.position is None or backward.position + 1 < stage.window:
            return False, None
        if backward.position > 0:
            sums = backward.state.slots[ACCUMULATE_SLOT]
    return True, sums


class Inflight:
    """The buckets of one backward pass: filled by grad hooks, launched in order, waited for by
    :meth:`result`."""

    def __init__(
        self,
        backward: Backward,
        buckets: list[Bucket],
        sums: AccumulateState | None,
        group: Any,
    ) -> None:
        self.step = backward.state.step  # which state's gradient this is (see Pending.take)
        self.names = backward.names
        self.shapes = [leaf.shape for leaf in backward.leaves]
        self.dtypes = [leaf.dtype for leaf in backward.leaves]
        self.leaves = backward.leaves
        self.weight = backward.weight
        self.metric_names = list(backward.metrics)
        self.sums = sums
        self.group = group
        self.buckets = buckets
        # What the host bucket carries after the gradients: the weight, then the metrics, to be
        # multiplied by it; with a window, the window's total weight and metric sums.
        self.metrics = backward.metrics
        if sums is None:
            self.total = backward.weight
            self.sums_of_metrics: list[Tensor] | None = None
        else:
            self.total = sums.weight + backward.weight
            self.sums_of_metrics = [
                (sums.metrics[n] + m * backward.weight).to(m.dtype)
                for n, m in backward.metrics.items()
            ]
        self.grads: list[Tensor | None] = [None] * len(backward.leaves)
        self.missing = [len(b.params) for b in buckets]
        self.where = {i: n for n, b in enumerate(buckets) for i in b.params}
        self.buffers: list[Tensor | None] = [None] * len(buckets)
        self.works: list[Any] = []
        self.launched = 0  # buckets launched so far, in order
        self.lock = threading.Lock()  # hooks of a CUDA backward run on autograd's threads
        self.handles = [leaf.register_hook(self._hook(i)) for i, leaf in enumerate(backward.leaves)]

    def _hook(self, i: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            with self.lock:
                self.grads[i] = grad
                n = self.where[i]
                self.missing[n] -= 1
                self._launch_ready()

        return hook

    def _piece(self, i: int, bucket: Bucket, w: Tensor) -> Tensor:
        g = self.grads[i]
        if g is None:  # no gradient reached it: zeros, as materialize_grads gives
            g = torch.zeros_like(self.leaves[i])
        if self.sums is not None:
            # accumulate's own window sum, s + g * w, in the parameter's dtype.
            g = self.sums.grads[self.names[i]] + g * self.weight
            return g.to(device=bucket.comm, dtype=bucket.dtype).reshape(-1)
        return (g.to(device=bucket.comm, dtype=bucket.dtype) * w).reshape(-1)

    def _launch(self, n: int) -> None:
        bucket = self.buckets[n]
        w = self.weight.to(device=bucket.comm, dtype=bucket.dtype, non_blocking=True)
        parts = [self._piece(i, bucket, w) for i in bucket.params]
        if bucket.host:  # as in the plain reduction: w, then m * w (or the window's sums)
            parts.append(self.total.to(device=bucket.comm, dtype=bucket.dtype).reshape(1))
            if self.sums_of_metrics is None:
                for m in self.metrics.values():
                    parts.append((m.to(device=bucket.comm, dtype=bucket.dtype) * w).reshape(1))
            else:
                for m in self.sums_of_metrics:
                    parts.append(m.to(device=bucket.comm, dtype=bucket.dtype).reshape(1))
        buffer = torch.cat(parts)
        for i in bucket.params:
            self.grads[i] = None  # the bucket holds them now
        self.buffers[n] = buffer
        self.works.append(
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        )

    def _launch_ready(self) -> None:
        while self.launched < len(self.buckets) and self.missing[self.launched] == 0:
            self._launch(self.launched)
            self.launched += 1

    def done(self) -> None:
        """After the backward pass: remove the hooks and launch what is left (buckets held by a
        parameter that got no gradient)."""
        for handle in self.handles:
            handle.remove()
        with self.lock:
            while self.launched < len(self.buckets):
                self._launch(self.launched)
                self.launched += 1

    def result(
        self, grads: Params, weight: Tensor, metrics: Metrics
    ) -> tuple[Params, Tensor, Metrics]:
        """Wait for every bucket and unpack: the reduced mean gradient, total weight and mean
        metrics, with the devices and dtypes of ``grads``, ``weight`` and ``metrics``."""
        for work in self.works:
            work.wait()
        host = next(n for n, b in enumerate(self.buckets) if b.host)
        tail = len(self.metric_names) + 1
        buffer = self.buffers[host]
        assert buffer is not None
        extra = buffer[-tail:]
        total = extra[0]
        reduced = {n: extra[1 + j] / total for j, n in enumerate(self.metric_names)}
        out: dict[str, Tensor] = {}
        for n, bucket in enumerate(self.buckets):
            buffer = self.buffers[n]
            assert buffer is not None
            if bucket.host:
                buffer = buffer[:-tail]
            mean = buffer / total.to(device=bucket.comm, dtype=buffer.real.dtype)
            pieces = mean.split([self.shapes[i].numel() for i in bucket.params])
            for i, piece in zip(bucket.params, pieces, strict=True):
                name = self.names[i]
                g = grads[name]
                out[name] = piece.view(self.shapes[i]).to(device=g.device, dtype=g.dtype)
        return (
            {name: out[name] for name in grads},
            total.to(device=weight.device, dtype=weight.dtype),
            {n: reduced[n].to(device=metrics[n].device, dtype=metrics[n].dtype) for n in metrics},
        )


class Pending:
    """Hands the reductions a backward pass launched to ``pmean``'s ``apply``, which runs next.

    One per ``pmean`` stage. :meth:`put` replaces whatever it held (each micro-batch's backward
    pass starts afresh); :meth:`take` gives it back only for the state it was launched for,
    once, so a stale launch (a step that raised in between) is never consumed.
    """

    def __init__(self) -> None:
        self._inflight: Inflight | None = None

    def put(self, inflight: Inflight | None) -> None:
        self._inflight = inflight

    def take(self, state: TrainState) -> Inflight | None:
        inflight, self._inflight = self._inflight, None
        if inflight is None or inflight.step is not state.step:
            return None
        return inflight


def start(
    backward: Backward,
    bucket_bytes: int,
    group: Any,
    comm: Callable[[torch.device], torch.device],
) -> Inflight | None:
    """Register the hooks of one backward pass, or ``None`` when this micro-batch's reduction
    cannot be overlapped (see :func:`window`) or no gradient is real-valued."""
    can, sums = window(backward)
    if not can:
        return None
    buckets = plan(backward.leaves, bucket_bytes, comm)
    if buckets is None:
        return None
    return Inflight(backward, buckets, sums, group)
