"""The running sums of an epoch's metrics, kept in the state (``state.slots["tally"]``).

``fit`` puts this stage last in the chain, after the optimizer: at every applied update it adds
the update's loss-side metrics weighted by the update's weight (its samples or tokens) and every
other metric (gradient norms, the learning rate) once. Micro-batches whose update is never
applied (a skipped non-finite step, a dropped partial window) are left out. The sums are
tensors, so the step reads nothing on the host; ``fit`` reads them once per epoch (or log), and
a checkpoint taken mid-epoch holds them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checkpoint import register_checkpoint_type
from ._step import ApplyFn, Micro, Stage
from ._types import Metrics, Tensor, TrainState

SLOT = "tally"


@register_checkpoint_type
class Tally(NamedTuple):
    """Sums since the last reset: ``weighted`` (loss-side metric times weight), ``weight``,
    ``updates`` (applied updates) and ``per_update`` (other metrics, summed over updates)."""

    weighted: Metrics
    weight: Tensor
    updates: Tensor
    per_update: Metrics

    def means(self) -> dict[str, Tensor]:
        """The averages as 0-d tensors: loss-side metrics by weight, the others by update."""
        tiny = torch.finfo(torch.float32).tiny
        out = {k: s / self.weight.clamp(min=tiny) for k, s in self.weighted.items()}
        out.update({k: s / self.updates.clamp(min=1) for k, s in self.per_update.items()})
        return out


def _zeros(state: TrainState, loss_keys: set[str]) -> Tally:
    device = state.step.device
    return Tally(
        weighted={k: torch.zeros_like(m) for k, m in state.metrics.items() if k in loss_keys},
        weight=torch.zeros((), dtype=torch.float32, device=device),
        updates=torch.zeros((), dtype=torch.int64, device=device),
        per_update={
            k: torch.zeros_like(m)
            for k, m in state.metrics.items()
            if k not in loss_keys and k != "weight"
        },
    )


def reset(state: TrainState) -> TrainState:
    """The state with its tally back to zero (a new epoch)."""
    tally: Tally = state.slots[SLOT]
    zero = Tally(
        {k: torch.zeros_like(m) for k, m in tally.weighted.items()},
        torch.zeros_like(tally.weight),
        torch.zeros_like(tally.updates),
        {k: torch.zeros_like(m) for k, m in tally.per_update.items()},
    )
    return state._replace(slots={**state.slots, SLOT: zero})


def tally() -> Stage:
    """The stage (see the module). Its ``init`` needs the loss-side metric names."""

    def init(state: TrainState, loss: Metrics | None) -> TrainState:
        if SLOT in state.slots:
            return state
        assert loss is not None  # Step.init probes the loss when a slot is missing
        keys = {k for k in loss if k != "weight"}
        return state._replace(slots={**state.slots, SLOT: _zeros(state, keys)})

    def wrap(inner: ApplyFn) -> ApplyFn:
        def apply(state: TrainState, micro: Micro) -> TrainState:
            state = inner(state, micro)
            old: Tally = state.slots[SLOT]
            w = micro.weight
            new = Tally(
                {k: s + (micro.metrics[k] * w).to(s.dtype) for k, s in old.weighted.items()},
                old.weight + w,
                old.updates + 1,
                {k: s + state.metrics[k].to(s.dtype) for k, s in old.per_update.items()},
            )
            return state._replace(slots={**state.slots, SLOT: new})

        return apply

    return Stage("tally()", wrap, init=init, slot=SLOT)
