"""Ensembles: N models trained as one, with ``torch.func.vmap``.

``stack`` turns N states into one whose every leaf has a leading ensemble axis; ``vmap(step)``
is a step that trains all N members at once on such a state. Each member keeps its own params,
optimizer state, counters and random key, so N members trained together equal N separate runs,
whatever their seeds (up to floating-point reassociation in batched kernels).

How it is done: the loss runs under ``torch.func.vmap`` on the stacked params (made leaves that
require grad, outside the transform), the gradient of the members' summed losses is taken once
with ``torch.autograd.grad`` (member i's loss depends only on member i's params, so this is each
member's own gradient), and the gradient stages and the optimizer run under ``vmap`` again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import optree
import torch

from . import _validate as v
from ._step import NO_CARRY, RNG, GradOut, Micro, Step, leaves_of, weighted_mean
from ._types import Metrics, TrainState


def stack(states: Sequence[TrainState]) -> TrainState:
    """One state whose every leaf stacks the leaves of ``states`` on a new leading axis.

    The states must have one structure, shapes and dtypes (from ``ll.init`` of one model and
    optimizer, and the same step's ``init``); their values, seeds included, may differ.

    Example:
        >>> import looplib as ll
        >>> model, opt = torch.nn.Linear(2, 1), ll.optim.sgd(lr=0.1)
        >>> both = ll.stack([ll.init(model, opt, seed=0), ll.init(model, opt, seed=1)])
        >>> tuple(both.params["weight"].shape), both.slots["rng"][:, 0].tolist()
        ((2, 1, 2), [0, 1])
    """
    if not isinstance(states, Sequence) or isinstance(states, TrainState) or not states:
        v.fail("stack", "states", "must be a non-empty list of TrainStates", states, exc=TypeError)
    for i, s in enumerate(states):
        if not isinstance(s, TrainState):
            v.fail("stack", f"states[{i}]", "must be a looplib TrainState", s, exc=TypeError)
    trees: list[Any] = list(states)
    spec = optree.tree_structure(trees[0], none_is_leaf=True)
    for i, s in enumerate(trees[1:], start=1):
        if optree.tree_structure(s, none_is_leaf=True) != spec:
            v.fail(
                "stack",
                f"states[{i}]",
                "must have the structure of states[0] (same model, optimizer and step)",
                s,
                exc=ValueError,
                fix="Complete each state with the same step first: step.init(state, batch).",
            )
    return cast(TrainState, optree.tree_map(lambda *xs: torch.stack(xs), *trees, none_is_leaf=True))


def unstack(state: TrainState) -> list[TrainState]:
    """The members of an ensemble state, as separate states (views into ``state``)."""
    if not isinstance(state, TrainState):
        v.fail("unstack", "state", "must be a looplib TrainState", state, exc=TypeError)
    n = int(state.step.shape[0]) if state.step.dim() == 1 else 0
    if n == 0:
        v.fail(
            "unstack",
            "state",
            "must be an ensemble state (from ll.stack), with a leading axis on every leaf",
            state.step,
        )
    tree: Any = state
    return [
        cast(TrainState, optree.tree_map(lambda x, i=i: x[i], tree, none_is_leaf=True))
        for i in range(n)
    ]


class Ensemble(NamedTuple):
    """How :func:`vmap` lifts a step's pieces over the ensemble axis."""

    batch_axis: int | None

    def __repr__(self) -> str:
        return "" if self.batch_axis is None else f", batch_axis={self.batch_axis}"

    def _forward(
        self,
        step: Step,
        state: TrainState,
        batch: Any,
        carry: Any,
        grad: bool,
        anchor: torch.Tensor | None = None,
    ) -> Any:
        """The members' loss outputs, metrics and buffers, computed under ``vmap``."""
        params = list(state.params.values())
        if grad and not step.model.training:
            step.model.train()
        if grad:
            params = leaves_of(params, anchor)
        has_carry = carry is not NO_CARRY and carry is not None
        start = carry  # NO_CARRY or None when there is nothing to map over

        def one(params: list[Any], buffers: list[Any], key: Any, batch: Any, carry: Any) -> Any:
            out, _, buffers = step.forward(
                params, buffers, key, batch, carry if has_carry else start, grad=grad
            )
            metrics = step._metrics(out, batch)
            new_carry = () if out.carry is None else out.carry
            return out.loss.reshape(()), metrics, buffers, new_carry

        in_dims = (0, 0, 0, self.batch_axis, 0 if has_carry else None)
        with torch.set_grad_enabled(grad):
            loss, metrics, buffers, new_carry = torch.func.vmap(
                one, in_dims=in_dims, randomness="error"
            )(
                params,
                list(state.buffers.values()),
                state.slots[RNG],
                batch,
                carry if has_carry else None,
            )
        return params, loss, metrics, buffers, (None if new_carry == () else new_carry)

    def gradient(
        self, step: Step, state: TrainState, batch: Any, carry: Any, anchor: Any = None
    ) -> GradOut:
        leaves, loss, metrics, buffers, new_carry = self._forward(
            step, state, batch, carry, True, anchor
        )
        if not loss.requires_grad:
            v.fail(
                "train_step",
                "loss_fn",
                "must return a loss computed from the model's parameters (it has no gradient)",
                loss,
            )
        scale = step.scale(state)  # one factor per member
        total = loss.sum() if scale is None else (loss * scale).sum()
        grads = torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)
        weight = metrics.pop("weight")
        ok = torch.isfinite(metrics["loss"])
        old = list(state.buffers.values())
        kept = [
            torch.where(ok.reshape((-1,) + (1,) * (b.dim() - 1)), new, b)
            for new, b in zip(buffers, old, strict=True)
        ]
        return GradOut(
            dict(zip(state.params, grads, strict=True)),
            weight,
            {k: m.detach() for k, m in metrics.items()},
            dict(zip(state.buffers, kept, strict=True)),
            new_carry,
        )

    def evaluate(self, step: Step, state: TrainState, batch: Any) -> Metrics:
        step.model.eval()
        try:
            with torch.no_grad():
                if step.split is None:
                    return self._forward(step, state, batch, NO_CARRY, False)[2]
                carry: Any = None
                parts = []
                for chunk in step.split.split(batch):
                    *_, metrics, _, carry = self._forward(step, state, chunk, carry, False)
                    parts.append(metrics)
                return weighted_mean(parts)
        finally:
            step.model.train()

    def lift(
        self, apply: Callable[[TrainState, Micro], TrainState], state: TrainState, micro: Micro
    ) -> TrainState:
        """``apply`` on every member: the gradient stages and the optimizer under ``vmap``."""

        def one(state: TrainState, grads: Any, weight: Any, metrics: Any) -> TrainState:
            return apply(state, Micro(grads, weight, metrics, micro.position, micro.inplace))

        return torch.func.vmap(one, randomness="error")(
            state, micro.grads, micro.weight, micro.metrics
        )

    def lift_state(self, fn: Callable[..., Any], state: Any, *args: Any) -> Any:
        """``fn(state, *args)`` for every member (arguments that are None stay None)."""
        in_dims = (0, *(None if a is None else 0 for a in args))
        return torch.func.vmap(fn, in_dims=in_dims, randomness="error")(state, *args)

    def probe(self, step: Step, state: TrainState, batch: Any, carry: Any) -> Metrics:
        step.model.train()
        with torch.no_grad():
            return self._forward(step, state, batch, carry, False)[2]


def vmap(step: Step, batch_axis: int | None = None) -> Step:
    """A step that trains an ensemble: every member of a :func:`stack`-ed state at once.

    ``batch_axis=None`` gives every member the same batch; ``batch_axis=0`` gives member ``i``
    the slice ``batch[i]`` of every tensor in the batch (each member its own data). Everything
    else is as for ``step``: every transformer, ``fold``, ``fit``, ``ll.compile``, checkpoints.
    ``state.metrics`` hold one value per member.

    Example:
        >>> import looplib as ll
        >>> model, opt = torch.nn.Linear(2, 1), ll.optim.sgd(lr=0.1)
        >>> step = ll.vmap(ll.train_step(model, lambda m, b: m(b).pow(2).mean(), opt))
        >>> states = ll.stack([ll.init(model, opt, seed=s) for s in range(3)])
        >>> tuple(ll.fold(step, states, [torch.ones(4, 2)] * 2).metrics["loss"].shape)
        (3,)
    """
    if not isinstance(step, Step):
        v.fail("vmap", "step", "must be a looplib Step (from ll.train_step)", step, exc=TypeError)
    if step.ensemble is not None:
        v.fail("vmap", "step", "must not be vmapped already", step)
    if batch_axis is not None and (not isinstance(batch_axis, int) or isinstance(batch_axis, bool)):
        v.fail("vmap", "batch_axis", "must be None or an int", batch_axis, exc=TypeError)
    return step.replace(ensemble=Ensemble(batch_axis))
