"""``accumulate``: sum K micro-batches' gradients, weighted by their sizes, into one update."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _validate as v
from ._checkpoint import register_checkpoint_type
from ._step import ApplyFn, Stage
from ._transform import Transformer, stage_transformer
from ._tree import grads_dict, select, zeros_like
from ._types import Params, Tensor, TrainState

SLOT = "accumulate"
PARTIAL_POLICIES = ("step", "drop", "carry")


@register_checkpoint_type
class AccumulateState(NamedTuple):
    """The ``accumulate`` slot: micro-batches seen in the open window, their total weight, and
    the weighted sum of their gradients."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count, as NamedTuple fields may
    weight: Tensor
    grads: Params


def _empty(params: Params, device: torch.device) -> AccumulateState:
    return AccumulateState(
        count=torch.zeros((), dtype=torch.int64, device=device),
        weight=torch.zeros((), dtype=torch.float32, device=device),
        grads=zeros_like(params),
    )


_TINY = torch.finfo(torch.float32).tiny  # weights are float32


def _mean(acc: Params, total: Tensor) -> Params:
    """The window's mean gradient. A window whose micro-batches all weigh 0 (say, chunks with no
    tokens) holds a zero sum and gives a zero gradient, not 0 / 0."""
    values = list(acc.values())
    total = total.clamp(min=_TINY)
    return grads_dict(
        zip(acc.keys(), torch._foreach_div(values, total) if values else [], strict=True)
    )


def accumulate(k: int, *, partial: str = "step") -> Transformer:
    """Accumulate the gradients of ``k`` micro-batches into one optimizer update.

    Each micro-batch's gradient ``g_i`` (of its mean loss) is summed weighted by its weight
    ``n_i`` (its sample count, or what the loss returns as ``LossOutput(weight=...)``), and the
    sum is divided once, when the window closes::

        g = (n_1 g_1 + ... + n_k g_k) / (n_1 + ... + n_k)

    so ``k`` micro-batches of any sizes give the update of one step on their concatenation (for
    mean-reduced losses); with equal sizes this is the classic ``loss / k``. During the first
    ``k - 1`` micro-batches the params, the optimizer state, ``state.step`` and any schedule stay
    put. ``accumulate(1)`` is the identity.

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

    def init(state: TrainState) -> TrainState:
        if SLOT in state.slots:
            return state
        slot = _empty(state.params, state.step.device)
        return state._replace(slots={**state.slots, SLOT: slot})

    def close(state: TrainState, slot: AccumulateState, inner: ApplyFn) -> TrainState:
        """Apply the window's mean gradient and reset the window."""
        fresh = _empty(slot.grads, slot.count.device)
        state = state._replace(slots={**state.slots, SLOT: fresh})
        return inner(state, _mean(slot.grads, slot.weight), slot.weight)

    def wrap(inner: ApplyFn) -> ApplyFn:
        def apply(state: TrainState, grads: Params, weight: Tensor) -> TrainState:
            slot: AccumulateState = state.slots[SLOT]
            values = list(grads.values())
            acc: list[Tensor] = list(slot.grads.values())
            if not values:
                summed: list[Tensor] = []
            elif weight.device.type == "cpu" and not torch.compiler.is_compiling():
                # One fused pass, acc + w * g, with the weight read on the host (it lives on
                # the CPU, so reading it waits for no device).
                summed = list(torch._foreach_add(acc, values, alpha=weight.item()))
            else:
                summed = list(torch._foreach_add(acc, torch._foreach_mul(values, weight)))
            slot = AccumulateState(
                count=slot.count + 1,
                weight=slot.weight + weight,
                grads=dict(zip(grads.keys(), summed, strict=True)),
            )
            full = slot.count >= k
            held = state._replace(slots={**state.slots, SLOT: slot})
            if torch.compiler.is_compiling():
                return select(full, close(state, slot, inner), held)
            if bool(full):
                return close(state, slot, inner)
            return held

        return apply

    def flush(state: TrainState, inner: ApplyFn) -> TrainState:
        slot: AccumulateState = state.slots[SLOT]
        if partial == "carry" or not bool(slot.count > 0):
            return state
        if partial == "drop":
            fresh = _empty(slot.grads, slot.count.device)
            return state._replace(slots={**state.slots, SLOT: fresh})
        return close(state, slot, inner)

    return stage_transformer(Stage(name, wrap, init=init, flush=flush, slot=SLOT))
