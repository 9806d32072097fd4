"""``accumulate``: sum K micro-batches' gradients, weighted by their sizes, into one update."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _ops
from . import _validate as v
from ._checkpoint import register_checkpoint_type
from ._step import ApplyFn, Micro, Stage, branch
from ._transform import Transformer, stage_transformer
from ._types import Metrics, Params, Tensor, TrainState

SLOT = "accumulate"
PARTIAL_POLICIES = ("step", "drop", "carry")


@register_checkpoint_type
class AccumulateState(NamedTuple):
    """The ``accumulate`` slot: micro-batches seen in the open window, their total weight, the
    weighted sum of their gradients and the weighted sums of their loss-side metrics."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count, as NamedTuple fields may
    weight: Tensor
    grads: Params
    metrics: Metrics


def _empty(state: TrainState, loss: Metrics) -> AccumulateState:
    device = state.step.device
    return AccumulateState(
        count=torch.zeros((), dtype=torch.int64, device=device),
        weight=torch.zeros((), dtype=torch.float32, device=device),
        grads={k: torch.zeros_like(p) for k, p in state.params.items()},
        metrics={k: torch.zeros_like(m) for k, m in loss.items() if k != "weight"},
    )


def _zeroed(slot: AccumulateState) -> AccumulateState:
    return AccumulateState(
        count=torch.zeros_like(slot.count),
        weight=torch.zeros_like(slot.weight),
        grads={k: torch.zeros_like(g) for k, g in slot.grads.items()},
        metrics={k: torch.zeros_like(m) for k, m in slot.metrics.items()},
    )


_TINY = torch.finfo(torch.float32).tiny  # weights are float32


def _mean_grads(slot: AccumulateState) -> Params:
    """The window's mean gradient. A window whose micro-batches all weigh 0 (say, chunks with no
    tokens) holds zero sums and gives zeros, not 0 / 0."""
    total = slot.weight.clamp(min=_TINY)
    return dict(zip(slot.grads, _ops.div(list(slot.grads.values()), total), strict=True))


def _mean_metrics(slot: AccumulateState) -> Metrics:
    total = slot.weight.clamp(min=_TINY)
    return {k: (m / total).to(m.dtype) for k, m in slot.metrics.items()}


def accumulate(k: int, *, partial: str = "step") -> Transformer:
    """Accumulate the gradients of ``k`` micro-batches into one optimizer update.

    Each micro-batch's gradient ``g_i`` (of its mean loss) is summed weighted by its weight
    ``n_i`` (its sample count, or what the loss returns as ``LossOutput(weight=...)``), and the
    sum is divided once, when the window closes::

        g = (n_1 g_1 + ... + n_k g_k) / (n_1 + ... + n_k)

    so ``k`` micro-batches of any sizes give the update of one step on their concatenation (for
    mean-reduced losses); with equal sizes this is the classic ``loss / k``. During the first
    ``k - 1`` micro-batches the params, the optimizer state, ``state.step`` and any schedule stay
    put. ``accumulate(1)`` is the identity. The loss-side metrics in ``state.metrics`` (``loss``
    and the loss's own) are the window's weighted means: of the micro-batches so far while it is
    open, of all ``k`` once it closes (``weight`` is the window's total weight).

    ``fold`` and ``fit`` hand the step whole windows, so only the closing micro-batch runs the
    optimizer; a lone ``step(state, batch)`` call decides by the window's count, a tensor, with
    a select (no host read).

    A window still open when the data ends is handled by ``step.flush(state)`` (``ll.fit`` calls
    it at the end of every epoch) according to ``partial``:

    * ``"step"`` (default): apply it, averaged over the samples it actually holds (never scaled
      by ``r / k``);
    * ``"drop"``: discard it;
    * ``"carry"``: keep it open, so the next epoch's first micro-batches complete it.

    Args:
        k: micro-batches per update, a positive int.
        partial: the end-of-data policy, one of ``"step"``, ``"drop"``, ``"carry"``.

    Returns:
        a transformer owning the slot ``state.slots["accumulate"]`` (an :class:`AccumulateState`).

    Example:
        >>> import looplib as ll
        >>> ll.accumulate(4)
        accumulate(4)
    """
    k = v.positive_int("accumulate", "k", k)
    v.one_of("accumulate", "partial", partial, PARTIAL_POLICIES)
    name = f"accumulate({k})" if partial == "step" else f"accumulate({k}, partial={partial!r})"
    if k == 1:
        # The identity, but it still owns the slot's name: accumulating twice has no meaning.
        return stage_transformer(Stage(name, lambda inner: inner, slot=SLOT))

    def init(state: TrainState, loss: Metrics | None) -> TrainState:
        if SLOT in state.slots:
            return state
        assert loss is not None  # Step.init probes the loss when a slot is missing
        return state._replace(slots={**state.slots, SLOT: _empty(state, loss)})

    def close(state: TrainState, slot: AccumulateState, inner: ApplyFn, micro: Micro) -> TrainState:
        """Apply the window's mean gradient and reset the window."""
        state = state._replace(slots={**state.slots, SLOT: _zeroed(slot)})
        window = Micro(_mean_grads(slot), slot.weight, _mean_metrics(slot), None, micro.inplace)
        return inner(state, window)

    def wrap(inner: ApplyFn) -> ApplyFn:
        def apply(state: TrainState, micro: Micro) -> TrainState:
            slot: AccumulateState = state.slots[SLOT]
            values = list(micro.grads.values())
            sums = {key: m * micro.weight for key, m in micro.metrics.items()}
            if micro.position == 0:
                # The window is known to be empty: start it, no sum with zeros.
                grads = _ops.mul(values, micro.weight)
                slot = AccumulateState(slot.count + 1, micro.weight, {}, sums)
            else:
                grads = _ops.add(list(slot.grads.values()), _ops.mul(values, micro.weight))
                slot = AccumulateState(
                    slot.count + 1,
                    slot.weight + micro.weight,
                    {},
                    {key: slot.metrics[key] + m for key, m in sums.items()},
                )
            slot = slot._replace(
                grads=dict(zip(micro.grads, grads, strict=True)),
                metrics={key: m.to(micro.metrics[key].dtype) for key, m in slot.metrics.items()},
            )
            full = slot.count >= k if micro.position is None else micro.position + 1 >= k

            def hold(state: TrainState, micro: Micro) -> TrainState:
                metrics = {**state.metrics, **_mean_metrics(slot), "weight": slot.weight}
                return state._replace(slots={**state.slots, SLOT: slot}, metrics=metrics)

            def apply_window(state: TrainState, micro: Micro) -> TrainState:
                return close(state, slot, inner, micro)

            return branch(full, apply_window, hold, state, micro)

        return apply

    def flush(state: TrainState, inner: ApplyFn) -> TrainState:
        if partial == "carry" or SLOT not in state.slots:  # nothing was ever accumulated
            return state
        slot: AccumulateState = state.slots[SLOT]
        if partial == "drop":
            return state._replace(slots={**state.slots, SLOT: _zeroed(slot)})

        def apply_window(state: TrainState, micro: Micro) -> TrainState:
            return close(state, slot, inner, micro)

        def keep(state: TrainState, micro: Micro) -> TrainState:
            return state

        # An empty window applies nothing: a select, so flush reads no device value either.
        return branch(slot.count > 0, apply_window, keep, state, Micro({}, slot.weight, {}))

    return stage_transformer(Stage(name, wrap, init=init, flush=flush, slot=SLOT, window=k))
