"""The pure training step: ``(state, batch) -> state``.

A :class:`Step` is made by :func:`train_step` and reshaped by transformers. One function,
:meth:`Step.run`, does all the work, eagerly, compiled and vmapped alike::

    def run(state, batches, start):
        for batch in batches:
            carry = None
            for chunk in split(batch):                      # one chunk unless tbptt_split
                grads, weight, metrics, buffers, carry = gradient(state, chunk, carry)
                state = apply(state._replace(buffers=buffers), Micro(grads, weight, metrics))
        return state

``gradient`` runs the loss with the state's params and buffers swapped into the module and takes
``torch.autograd.grad`` while they are in place (so activation checkpointing recomputes on the
state's tensors), drawing random numbers from the key in the state (see ``_random.py``).
``apply`` is the chain of gradient stages (``accumulate``, ``track_norm``, ``clip``, ...) ending
in the optimizer. ``start`` is the position in the accumulation window when the caller knows it
(``fold`` and ``fit`` do): then which micro-batch closes a window is a Python fact and only the
closing one runs the optimizer. Without it (a single ``step(state, batch)`` call) the window
closes by a tensor select, with no host read either way.

A step never reads a device value on the host, and the state it returns has exactly the structure
it received: :meth:`Step.init` adds every slot, counter and metric a chain will write before the
first call.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch
from torch import nn

from . import _ops, _random
from . import _validate as v
from ._swap import Swapper
from ._tree import StructureChange, detach, select, shapes_only, structure_difference
from ._types import Metrics, Optimizer, Params, Tensor, TrainState, describe

RNG = _random.SLOT

STRUCTURE_HELP = (
    "A step must return a state with exactly the structure, shapes and dtypes it received; "
    "check the transformer, optimizer or loss function that writes this entry."
)
INIT_NEEDS_BATCH = (
    "step.init(state): this state has no loss metrics yet, so the step must see an example batch "
    "to learn what the loss reports; call step.init(state, batch) (fold, fit, and a first "
    "step(state, batch) do this for you)."
)


class _NoCarry:
    def __repr__(self) -> str:
        return "NO_CARRY"


NO_CARRY: Any = _NoCarry()
"""Sentinel: the loss function takes no carry (``loss_fn(model, batch)``)."""


class LossOutput(NamedTuple):
    """What a loss function may return, in full.

    A loss function may also return just the loss tensor, ``(loss, metrics)`` or
    ``(loss, metrics, carry)``; missing parts default to no metrics, no carry, and the batch's
    sample count as the weight.

    Attributes:
        loss: a 0-d tensor, the mean loss over the batch's samples (or tokens, see ``weight``).
        metrics: a dict of one-element tensors to report, averaged by ``weight`` over the
            micro-batches of an update.
        carry: the hidden state to hand to the next chunk under :func:`tbptt_split`.
        weight: how many units the mean ``loss`` averages over (samples, non-padding tokens);
            accumulation weights each micro-batch's gradient by it. ``None`` means the sample
            count of the batch.
    """

    loss: Tensor
    metrics: Mapping[str, Tensor] | None = None
    carry: Any = None
    weight: Tensor | float | int | None = None


class Micro(NamedTuple):
    """One gradient on its way through the gradient stages to the optimizer.

    Attributes:
        grads: the weighted mean gradient, keyed like ``state.params``.
        weight: the total weight (samples, tokens) it averages over, a 0-d float32 tensor.
        metrics: the loss-side metrics (``loss`` and the loss's own), averaged alike.
        position: how many micro-batches the accumulation window held before this one, when
            the caller knows it (a Python int); ``None``: read it from the state.
        inplace: the optimizer may write into the state's tensors (the state is donated).
        norms: p-norms already computed for exactly these ``grads``, ``{p: (each, total)}``,
            or None; a stage that changes the gradient passes None on. Never written into.
    """

    grads: Params
    weight: Tensor
    metrics: Metrics
    position: int | None = None
    inplace: bool = False
    norms: dict[float, tuple[list[Tensor], Tensor]] | None = None


ApplyFn = Callable[[TrainState, Micro], TrainState]
"""``apply(state, micro) -> state``: consume one gradient."""


class Stage(NamedTuple):
    """A gradient stage: a transformer acting between the gradient and the optimizer.

    ``wrap(inner) -> apply`` builds this stage's ``apply`` around the ``apply`` of the stages
    after it. ``init(state, loss) -> state`` adds the stage's slot and the metrics it writes
    where missing (and leaves them alone otherwise); ``loss`` holds the loss-side metrics (with
    their dtypes) whenever a slot is missing, else ``None``. ``flush(state, inner) -> state`` ends a pending
    accumulation window. ``window`` is how many micro-batches make one update (``accumulate``).
    ``check(state)`` is a host-side check that ``fold`` and ``fit`` run where they read the
    state anyway (the step itself never reads a device value). ``holds`` says the stage may
    hold a gradient back on a tensor condition (``skip_nonfinite``), so that a window after it
    cannot count its micro-batches in Python. ``scale(state)``, for a stage that scales the loss
    (``loss_scale``), gives the factor the loss is multiplied by before the backward pass; the
    stage divides it out of the gradient itself. ``overlap(backward) -> done | None`` lets a
    stage start work on the gradient while the backward pass still produces it (``pmean``
    launches its all-reduce per bucket of finished gradients): eager steps (not compiled, not
    vmapped) call the first stage that has one just before ``torch.autograd.grad``, with a
    :class:`Backward`; it may register grad hooks on ``backward.leaves`` and return ``done``,
    called once the backward pass has returned (it ends what the hooks could not). The stage's
    ``apply`` then picks up what the hooks started. ``None``: nothing to overlap this time.
    """

    name: str
    wrap: Callable[[ApplyFn], ApplyFn]
    init: Callable[[TrainState, Metrics | None], TrainState] | None = None
    flush: Callable[[TrainState, ApplyFn], TrainState] | None = None
    slot: str | None = None
    window: int = 1
    check: Callable[[TrainState], None] | None = None
    holds: bool = False
    scale: Callable[[TrainState], Tensor] | None = None
    overlap: Callable[[Backward], Callable[[], None] | None] | None = None


class Backward(NamedTuple):
    """What a stage's ``overlap`` sees just before the backward pass of one micro-batch.

    Attributes:
        state: the state the gradient is taken at (never written into).
        position: the micro-batch's position in the accumulation window when known (a Python
            int, see :class:`Micro`), else ``None``.
        before: the stages in front of this one in the chain (they see the gradient first).
        names: the parameter names, in the state's order.
        leaves: the tensors the gradient is taken with respect to, in that order.
        weight: the micro-batch's weight, as the stages will receive it.
        metrics: its loss-side metrics, as the stages will receive them.
    """

    state: TrainState
    position: int | None
    before: tuple[Stage, ...]
    names: list[str]
    leaves: list[Tensor]
    weight: Tensor
    metrics: Metrics


class Split(NamedTuple):
    """A batch stage: how one batch becomes a sequence of chunks sharing a carry."""

    name: str
    split: Callable[[Any], Sequence[Any]]


class GradOut(NamedTuple):
    grads: Params
    weight: Tensor
    metrics: Metrics
    buffers: Params
    carry: Any


def sample_count(batch: Any) -> int:
    """The default weight of a batch: its number of samples.

    The rule: a tensor counts its first dimension; a tuple, list or dict counts its first
    element (a dict its first value); a list or tuple of tensors *inside* the batch (variable-
    length sequences, as in ``(seqs, targets)``) counts its length.

    >>> sample_count((torch.zeros(8, 3), torch.zeros(8)))
    8
    >>> sample_count(([torch.zeros(5), torch.zeros(2)], torch.zeros(2)))
    2
    """
    node = batch
    for depth in range(64):
        if isinstance(node, torch.Tensor):
            if node.dim() == 0:
                break
            return int(node.shape[0])
        if isinstance(node, Mapping):
            if not node:
                break
            node = next(iter(node.values()))
            continue
        if isinstance(node, (list, tuple)):
            if not node:
                break
            if depth > 0 and all(isinstance(x, torch.Tensor) for x in node):
                return len(node)
            node = node[0]
            continue
        break
    v.fail(
        "train_step",
        "batch",
        "must start with a tensor whose first dimension counts the samples (or a list of "
        "variable-length sequences)",
        batch,
        fix="Return LossOutput(loss, metrics, weight=...) from the loss, or pass "
        "train_step(..., weight=fn).",
    )


def call_loss(loss_fn: Callable[..., Any], model: nn.Module, batch: Any, carry: Any) -> Any:
    if carry is NO_CARRY:
        return loss_fn(model, batch)
    return loss_fn(model, batch, carry)


def _as_loss_output(out: Any) -> LossOutput:
    if isinstance(out, LossOutput):
        result = out
    elif isinstance(out, torch.Tensor):
        result = LossOutput(out)
    elif isinstance(out, tuple) and 1 <= len(out) <= 3:
        result = LossOutput(*out)
    else:
        v.fail(
            "train_step",
            "loss_fn",
            "must return a loss tensor, (loss, metrics), (loss, metrics, carry) or a LossOutput",
            out,
            exc=TypeError,
        )
    if not isinstance(result.loss, torch.Tensor) or result.loss.numel() != 1:
        v.fail(
            "train_step", "loss_fn", "must return a scalar loss tensor", result.loss, exc=TypeError
        )
    if result.metrics is not None and not isinstance(result.metrics, Mapping):
        v.fail(
            "train_step",
            "loss_fn",
            "must return metrics as a dict of tensors",
            result.metrics,
            exc=TypeError,
        )
    return result


def _metric_dtype(value: Tensor) -> torch.dtype:
    return value.dtype if value.is_floating_point() else torch.float32


def weighted_mean(parts: Sequence[Metrics]) -> Metrics:
    """Average metrics dicts by their ``"weight"`` entries; the result's weight is the total."""
    if not parts:
        return {}
    total = parts[0]["weight"]
    for m in parts[1:]:
        total = total + m["weight"]
    out = {}
    for key in parts[0]:
        if key != "weight":
            acc = parts[0][key] * parts[0]["weight"]
            for m in parts[1:]:
                acc = acc + m[key] * m["weight"]
            out[key] = acc / total
    out["weight"] = total
    return out


def branch(
    pred: bool | Tensor,
    if_true: ApplyFn,
    if_false: ApplyFn,
    state: TrainState,
    micro: Micro,
) -> TrainState:
    """``if_true(state, micro) if pred else if_false(state, micro)``, for a stage.

    A Python ``bool`` runs one branch. A 0-d bool tensor runs both and selects leaf by leaf
    with ``torch.where``: no host read, so it works eagerly, compiled, in a CUDA graph and
    under ``vmap``. Both branches must return the same structure; they see ``inplace=False``,
    since writing into the state would spoil the branch not taken.
    """
    if isinstance(pred, bool):
        return if_true(state, micro) if pred else if_false(state, micro)
    pure = micro._replace(inplace=False)
    return select(pred, if_true(state, pure), if_false(state, pure))


class Step:
    """A pure training step, ``(state, batch) -> state``; build one with :func:`train_step`.

    Calling it never changes any tensor of the state it receives (unless the step was made with
    :func:`donate`) and returns a state with the same structure, shapes and dtypes. Transformers
    return new steps; a step is never modified.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Any],
        opt: Optimizer,
        *,
        weight: Callable[[Any], Any] | None = None,
        stages: tuple[Stage, ...] = (),
        split: Split | None = None,
        donate: bool = False,
        ensemble: Any = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.opt = opt
        self.weight = weight
        self.stages = stages
        self.split = split
        self.donate = donate
        self.ensemble = ensemble
        self.window = max((s.window for s in stages), default=1)
        # A stage before the window that may hold a gradient back on a tensor condition
        # (skip_nonfinite) makes the window's position a tensor fact, not a Python one.
        before_window = next((i for i, s in enumerate(stages) if s.window > 1), 0)
        self._positions_known = not any(s.holds for s in stages[:before_window])
        self._swapper = Swapper(model)
        self._param_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        # Whether the loss draws random numbers: learned on the first call, which runs under
        # the keyed generator; a loss that draws nothing then runs without that layer.
        self._draws: bool | None = None
        # Each stage's apply wraps the applies of the stages after it; keep, per stage, what it
        # hands the gradient to (flush needs it) and the outermost apply.
        apply: ApplyFn = self._optimizer_apply
        inners: list[ApplyFn] = []
        for stage in reversed(stages):
            inners.append(apply)
            apply = stage.wrap(apply)
        self._inners: list[ApplyFn] = inners[::-1]
        self.apply: ApplyFn = apply
        self._known: Any = None  # the last state signature checked and found good
        self._reference: Any = None  # that state's shapes and dtypes, on the meta device

    # -- construction ----------------------------------------------------------------------
    def replace(self, **changes: Any) -> Step:
        """A new step with some of ``stages``, ``split``, ``donate``, ``ensemble`` replaced."""
        fields = {
            "weight": self.weight,
            "stages": self.stages,
            "split": self.split,
            "donate": self.donate,
            "ensemble": self.ensemble,
        }
        fields.update(changes)
        return Step(self.model, self.loss_fn, self.opt, **fields)

    def __repr__(self) -> str:
        parts = ([self.split.name] if self.split else []) + [s.name for s in self.stages]
        loss = getattr(self.loss_fn, "__name__", "loss_fn")
        inner = f"train_step({type(self.model).__name__}, {loss})"
        if self.donate:
            inner = f"donate({inner})"
        text = f"chain({', '.join(parts)})({inner})" if parts else inner
        return text if self.ensemble is None else f"vmap({text}{self.ensemble!r})"

    # -- the structure ---------------------------------------------------------------------
    def _complete(self, state: TrainState) -> bool:
        return "loss" in state.metrics and RNG in state.slots

    def init(self, state: TrainState, batch: Any = NO_CARRY) -> TrainState:
        """The state with every slot, counter and metric this step will write, where missing.

        The loss's metric names, shapes and dtypes come from one forward pass on ``batch`` (no
        gradient, the state left as it was), so a state without them (or without a slot a
        transformer needs) takes an example batch. Idempotent: a complete state comes back as
        it is.
        """
        v.train_state("step.init", state)
        loss: Metrics | None = None
        incomplete = "loss" not in state.metrics or any(
            s.slot is not None and s.init is not None and s.slot not in state.slots
            for s in self.stages
        )
        if incomplete and batch is NO_CARRY:
            raise ValueError(INIT_NEEDS_BATCH)
        if incomplete or (self._draws is None and batch is not NO_CARRY):
            # One forward pass: the loss's metrics, and (learnt before anything is compiled)
            # whether the loss draws random numbers.
            probed = self._probe(state, batch)
            if incomplete:
                loss = probed
                state = state._replace(metrics={**loss, **state.metrics})
        if RNG not in state.slots:
            state = state._replace(
                slots={**state.slots, RNG: _random.new_key(None, state.step.device)}
            )
        hyper = self.opt.hyperparams
        lift = self.ensemble.lift_state if self.ensemble is not None else _call
        if hyper is not None:
            values = lift(hyper, state.opt_state)
            if not all(k in state.metrics for k in values):
                state = state._replace(metrics={**state.metrics, **values})
        for stage in self.stages:
            if stage.init is not None:
                state = lift(stage.init, state, loss)
        return state

    def _probe(self, state: TrainState, batch: Any) -> Metrics:
        """The loss-side metrics (NaN, with their final dtypes) learned from one forward pass."""
        chunk = self.split.split(batch)[0] if self.split is not None else batch
        carry = None if self.split is not None else NO_CARRY
        if self.ensemble is not None:
            metrics = self.ensemble.probe(self, state, chunk, carry)
        else:
            key = state.slots.get(RNG, torch.zeros(2, dtype=torch.int64, device=state.step.device))
            with torch.no_grad():
                out, _, _ = self._loss(state, key, chunk, carry, differentiate=False)
                metrics = self._metrics(out, chunk)
        weight = metrics.pop("weight")
        return {k: torch.full_like(m, float("nan")) for k, m in metrics.items()} | {
            "weight": torch.zeros_like(weight)
        }

    def check_structure(self, state: TrainState, func: str = "step") -> None:
        """Raise, naming the path, if ``state`` does not fit this step: its params must have the
        model's names and shapes, and its structure, shapes and dtypes those of the states this
        step has seen. Costs one flatten of the state (no device access)."""
        v.train_state(func, state)
        signature = _signature(state)
        if signature == self._known:
            return
        lead = 1 if self.ensemble is not None else 0
        for name, shape in self._param_shapes.items():
            p = state.params.get(name)
            if p is None or tuple(p.shape[lead:]) != shape:
                got = "missing" if p is None else describe(p)
                raise ValueError(
                    f"{func}(state=...): state.params[{name!r}] must have the model's shape "
                    f"{shape}, got {got}. Was this state made by ll.init for another model?"
                )
        if len(state.params) != len(self._param_shapes):
            extra = sorted(set(state.params) - set(self._param_shapes))
            raise ValueError(
                f"{func}(state=...): state.params has entries the model does not: {extra}. Was "
                "this state made by ll.init for another model?"
            )
        if self._known is not None and signature[0] == self._known[0]:
            # Same containers; a leaf changed shape or dtype.
            raise ValueError(
                f"{func}(state=...): {_leaf_difference(self._reference, state)}. {STRUCTURE_HELP}"
            )
        self._known = signature
        self._reference = shapes_only(state)

    def check_output(self, before: TrainState, after: TrainState) -> None:
        """Raise, naming the path, when ``after`` differs from ``before`` in structure."""
        if _signature(after) == _signature(before):
            return
        bad = structure_difference(before, after)
        raise ValueError(f"{self!r}: {bad}. {STRUCTURE_HELP}")

    # -- the pieces ------------------------------------------------------------------------
    def _randomness(self, key: Tensor) -> Any:
        if self._draws is False:
            return contextlib.nullcontext()
        return _random.keyed(key)

    def _loss(
        self,
        state: TrainState,
        key: Tensor,
        batch: Any,
        carry: Any,
        *,
        differentiate: bool,
        anchor: Tensor | None = None,
        position: int | None = None,
    ) -> tuple[LossOutput, Any, list[Tensor]]:
        """Run the loss on the state's params and buffers; with ``differentiate``, also its
        gradient. Returns the loss output, the gradients and the buffers as the module left
        them."""
        params = list(state.params.values())
        buffers = list(state.buffers.values())
        if not self.model.training:
            self.model.train()
        if differentiate:
            leaves = leaves_of(params, anchor)
            # Compiled steps (an anchor) take the whole gradient first: no hooks in the graph.
            overlap = None if anchor is not None else self._overlap(state, position, leaves, batch)
            return self.forward(
                leaves,
                buffers,
                key,
                batch,
                carry,
                grad=True,
                wrt=leaves,
                scale=self.scale(state),
                overlap=overlap,
            )
        return self.forward(params, buffers, key, batch, carry, grad=False)

    def _overlap(
        self, state: TrainState, position: int | None, leaves: list[Tensor], batch: Any
    ) -> Callable[[LossOutput], Callable[[], None] | None] | None:
        """The first stage's ``overlap`` (see :class:`Stage`) as a function of the loss output,
        or None when no stage has one."""
        i = next((i for i, s in enumerate(self.stages) if s.overlap is not None), None)
        if i is None:
            return None
        start = self.stages[i].overlap
        assert start is not None
        before = self.stages[:i]

        def before_backward(out: LossOutput) -> Callable[[], None] | None:
            metrics = self._metrics(out, batch)
            weight = metrics.pop("weight")
            names = list(state.params)
            return start(Backward(state, position, before, names, leaves, weight, metrics))

        return before_backward

    def forward(
        self,
        params: list[Tensor],
        buffers: list[Tensor],
        key: Tensor,
        batch: Any,
        carry: Any,
        *,
        grad: bool,
        wrt: list[Tensor] | None = None,
        scale: Tensor | None = None,
        overlap: Callable[[LossOutput], Callable[[], None] | None] | None = None,
    ) -> tuple[LossOutput, Any, list[Tensor]]:
        """The loss with ``params`` and (copies of) ``buffers`` swapped into the module, random
        numbers keyed by ``key``, autograd recording when ``grad``. With ``wrt``, also the
        gradient with respect to those tensors, taken while they are still in the module (so a
        checkpointed block recomputes on them); ``overlap`` is called with the loss output just
        before that backward pass, and what it returns just after (a stage's ``overlap``, see
        :class:`Stage`). Returns ``(loss output, grads, buffers)``."""
        buffers = [b.clone() for b in buffers]

        def run() -> tuple[LossOutput, Any]:
            with self._randomness(key) as mode, torch.set_grad_enabled(grad):
                out = _as_loss_output(call_loss(self.loss_fn, self.model, batch, carry))
            if mode is not None and self._draws is None and self.model.training:
                self._draws = mode.draws > 0  # learnt in train mode (eval has no dropout)
            if wrt is None:
                return out, None
            if not out.loss.requires_grad:
                v.fail(
                    "train_step",
                    "loss_fn",
                    "must return a loss computed from the model's parameters (it has no "
                    "gradient: was it detached, or computed under torch.no_grad?)",
                    out.loss,
                )
            target = out.loss if scale is None else out.loss * scale
            done = overlap(out) if overlap is not None else None
            grads = torch.autograd.grad(target, wrt, allow_unused=True, materialize_grads=True)
            if done is not None:
                done()
            return out, grads

        (out, grads), buffers = self._swapper.call(params, buffers, run)
        return out, grads, buffers

    def _metrics(self, out: LossOutput, batch: Any) -> Metrics:
        if out.weight is not None:
            weight = torch.as_tensor(out.weight, dtype=torch.float32).detach()
        elif self.weight is not None:
            weight = torch.as_tensor(self.weight(batch), dtype=torch.float32)
        else:
            weight = _weight_tensor(sample_count(batch), out.loss.device)
        loss = out.loss.detach().reshape(())
        metrics = {"loss": loss}
        for key, value in (out.metrics or {}).items():
            if key in ("loss", "weight"):
                v.fail(
                    "train_step",
                    "loss_fn",
                    "must not return a metric named 'loss' or 'weight' (looplib reports those)",
                    key,
                )
            value = torch.as_tensor(value).detach()
            if value.numel() != 1:
                v.fail(
                    "train_step",
                    "loss_fn",
                    f"must return one-element metrics; metric {key!r} is not",
                    value,
                )
            metrics[key] = value.reshape(()).to(_metric_dtype(value))
        metrics["weight"] = weight.to(loss.device)
        return metrics

    def scale(self, state: TrainState) -> Tensor | None:
        """The factor the loss is multiplied by before the backward pass (``loss_scale``)."""
        factor: Tensor | None = None
        for stage in self.stages:
            if stage.scale is not None:
                value = stage.scale(state)
                factor = value if factor is None else factor * value
        return factor

    def gradient(
        self,
        state: TrainState,
        batch: Any,
        carry: Any = NO_CARRY,
        anchor: Tensor | None = None,
        position: int | None = None,
    ) -> GradOut:
        """Run the loss on ``batch`` and return its gradient with respect to ``state.params``
        (``anchor``: see :func:`leaves_of`; ``position``: the micro-batch's window position when
        known, for a stage's ``overlap``)."""
        if self.ensemble is not None:
            return self.ensemble.gradient(self, state, batch, carry, anchor)
        out, grads, buffers = self._loss(
            state,
            state.slots[RNG],
            batch,
            carry,
            differentiate=True,
            anchor=anchor,
            position=position,
        )
        metrics = self._metrics(out, batch)
        weight = metrics.pop("weight")
        old = list(state.buffers.values())
        if buffers:
            # A micro-batch whose loss is not finite leaves the buffers as they were, so one bad
            # batch cannot poison BatchNorm's running statistics (a select, no host sync).
            ok = torch.isfinite(metrics["loss"])
            buffers = [torch.where(ok, new, b) for new, b in zip(buffers, old, strict=True)]
        return GradOut(
            dict(zip(state.params.keys(), grads, strict=True)),
            weight,
            metrics,
            dict(zip(state.buffers.keys(), buffers, strict=True)),
            out.carry,
        )

    def apply_micro(self, state: TrainState, micro: Micro) -> TrainState:
        """The gradient stages and the optimizer (each ensemble member on its own under
        :func:`looplib.vmap`)."""
        try:
            if self.ensemble is not None:
                return self.ensemble.lift(self.apply, state, micro)
            return self.apply(state, micro)
        except StructureChange as change:  # from a select between two paths of the step
            raise ValueError(f"{self!r}: {change}. {STRUCTURE_HELP}") from None

    def _optimizer_apply(self, state: TrainState, micro: Micro) -> TrainState:
        if micro.inplace and self.opt.update_ is not None:
            params, opt_state = self.opt.update_(micro.grads, state.opt_state, state.params)
        else:
            params, opt_state = self.opt.update(micro.grads, state.opt_state, state.params)
        metrics = {**state.metrics, **micro.metrics, "weight": micro.weight}
        if self.opt.hyperparams is not None:
            metrics.update(self.opt.hyperparams(opt_state))
        return state._replace(
            params=params, opt_state=opt_state, step=state.step + 1, metrics=metrics
        )

    def evaluate(self, state: TrainState, batch: Any) -> Metrics:
        """The loss metrics of one batch in eval mode, without gradients (as tensors).

        Under ``tbptt_split`` the batch runs chunk by chunk with the carry, as in training, and
        the metrics are averaged over the chunks by weight. Never changes ``state``.
        """
        if self.ensemble is not None:
            return self.ensemble.evaluate(self, state, batch)
        key = state.slots.get(RNG, torch.zeros(2, dtype=torch.int64, device=state.step.device))
        self.model.eval()
        try:
            with torch.no_grad():
                params = list(state.params.values())
                buffers = list(state.buffers.values())
                if self.split is None:
                    out, _, _ = self.forward(params, buffers, key, batch, NO_CARRY, grad=False)
                    return self._metrics(out, batch)
                carry: Any = None
                parts = []
                for chunk in self.split.split(batch):
                    out, _, _ = self.forward(params, buffers, key, chunk, carry, grad=False)
                    carry = out.carry
                    parts.append(self._metrics(out, chunk))
                return weighted_mean(parts)
        finally:
            self.model.train()

    # -- running ---------------------------------------------------------------------------
    def chunks(self, batch: Any) -> Sequence[Any]:
        """The micro-batches of one batch: its time chunks under ``tbptt_split``, else itself."""
        return (batch,) if self.split is None else self.split.split(batch)

    def run(
        self,
        state: TrainState,
        batches: Sequence[Any],
        start: int | None = None,
        donate: bool = False,
        anchor: Tensor | None = None,
    ) -> TrainState:
        """Run ``batches`` in order, every micro-batch through gradient, stages and optimizer.

        ``start`` is the number of micro-batches the state's accumulation window already holds,
        when the caller knows it (then the window's closing is decided in Python); ``None`` reads
        it from the state's tensors. ``donate`` lets the optimizer write into ``state`` (the
        caller will not use it again). ``anchor`` is how gradients are taken (see
        :func:`leaves_of`; compiled steps pass one). The state must be complete (see
        :meth:`init`).
        """
        position = start if self._positions_known else None
        inplace = self.donate or donate
        for batch in batches:
            carry = NO_CARRY if self.split is None else None
            for chunk in self.chunks(batch):
                out = self.gradient(state, chunk, carry, anchor, position)
                slots = {**state.slots, RNG: _random.advance(state.slots[RNG])}
                state = state._replace(buffers=out.buffers, slots=slots)
                micro = Micro(out.grads, out.weight, out.metrics, position, inplace)
                state = self.apply_micro(state, micro)
                if position is not None:
                    position = (position + 1) % self.window
                carry = detach(out.carry)
        return state

    def __call__(self, state: TrainState, batch: Any) -> TrainState:
        v.train_state("step", state)
        state = self.init(state, batch)
        self.check_structure(state)
        new = self.run(state, (batch,))
        self.check_output(state, new)
        return new

    def position(self, state: TrainState) -> int:
        """How many micro-batches the state's accumulation window holds (one host read, only
        when the step accumulates)."""
        for stage in self.stages:
            if stage.window > 1 and stage.slot in state.slots:
                # Ensemble members move in step: the first member's count is everyone's.
                return int(state.slots[stage.slot].count.reshape(-1)[0])
        return 0

    def groups(self, batches: Iterable[Any], position: int) -> Iterator[tuple[list[Any], int]]:
        """Cut a stream of batches into calls of :meth:`run`: whole accumulation windows (or
        one batch at a time under ``tbptt_split``), each with its start position."""
        if self.window == 1:
            for batch in batches:
                yield [batch], 0
            return
        if self.split is not None:
            for batch in batches:
                yield [batch], position
                position = (position + len(self.chunks(batch))) % self.window
            return
        group: list[Any] = []
        first = position
        for batch in batches:
            group.append(batch)
            position += 1
            if position == self.window:
                yield group, first
                group, first, position = [], 0, 0
        if group:
            yield group, first

    def flush(self, state: TrainState) -> TrainState:
        """End any pending accumulation window by its ``partial`` policy (see ``accumulate``)."""
        for stage, inner in zip(self.stages, self._inners, strict=True):
            if stage.flush is not None:
                flush = functools.partial(_flush_with, stage.flush, inner)
                if self.ensemble is not None:
                    state = self.ensemble.lift_state(flush, state)
                else:
                    state = flush(state)
        return state

    def check(self, state: TrainState) -> None:
        """Run the stages' host-side checks (``skip_nonfinite``'s limit): one host read each."""
        for stage in self.stages:
            if stage.check is not None:
                stage.check(state)


def _weight_tensor(count: int, device: torch.device) -> Tensor:
    """A batch's sample count as a 0-d float32 tensor (a fill: no copy from the host)."""
    return torch.full((), float(count), dtype=torch.float32, device=device)


def leaves_of(params: list[Tensor], anchor: Tensor | None = None) -> list[Tensor]:
    """Tensors equal to ``params`` (detached from any history) whose gradient autograd takes.

    Without ``anchor``, detached aliases marked ``requires_grad``. With ``anchor`` (a 0-d zero
    that requires grad), ``p.detach() + anchor``: the same values, made differentiable by
    arithmetic rather than by ``requires_grad_``, which some compiler releases cannot trace
    (torch 2.11's). Compiled steps pass one; the extra additions cost nothing in a graph.
    """
    if anchor is None:
        return [p.detach().requires_grad_(True) for p in params]
    return _ops.add([p.detach() for p in params], anchor)


def _flush_with(
    flush: Callable[[TrainState, ApplyFn], TrainState], inner: ApplyFn, state: TrainState
) -> TrainState:
    return flush(state, inner)


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _signature(state: TrainState) -> tuple[Any, tuple[Any, ...]]:
    tree: Any = state
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=True)
    return spec, tuple(
        (x.shape, x.dtype) if isinstance(x, torch.Tensor) else type(x) for x in leaves
    )


def _leaf_difference(reference: Any, state: TrainState) -> str:
    bad = structure_difference(reference, shapes_only(state), devices=False)
    return bad if bad is not None else "the state changed"


def donate(step: Step) -> Step:
    """The same step, consuming its input state: the optimizer writes the new params and
    optimizer state into the input's tensors instead of new ones.

    This is the donation contract of JAX's ``donate_argnums``, for eager PyTorch: the caller
    promises not to use a state again once it has passed it to the step (``state = step(state,
    batch)`` keeps that promise; keeping old states around does not). In exchange an update
    allocates no parameter-sized memory beyond the optimizer's temporaries, so peak memory is
    close to a hand-written loop's. Results are bit for bit those of the pure step. Optimizers
    without an in-place form (``update_``) update out of place as usual. ``fold`` and ``fit``
    donate the states they make themselves, never the one passed in.

    Example:
        >>> import looplib as ll
        >>> model, opt = torch.nn.Linear(2, 1), ll.optim.sgd(lr=0.1)
        >>> step = ll.donate(ll.train_step(model, lambda m, b: m(b).pow(2).mean(), opt))
        >>> state = step(ll.init(model, opt), torch.ones(4, 2))
        >>> weight = state.params["weight"]
        >>> state = step(state, torch.ones(4, 2))
        >>> state.params["weight"] is weight     # updated in place
        True
    """
    if not isinstance(step, Step):
        v.fail("donate", "step", "must be a looplib Step (from ll.train_step)", step, exc=TypeError)
    return step.replace(donate=True)


def init(model: nn.Module, opt: Optimizer, *, seed: int | None = None) -> TrainState:
    """Build the initial :class:`TrainState` for ``model`` trained by ``opt``.

    The state holds copies of the module's parameters and buffers (the module itself is left
    untouched and serves as a template), the optimizer's fresh state, ``step = 0``, empty
    ``metrics`` and, in ``slots["rng"]``, the key of the random numbers the step draws (dropout):
    ``[seed, 0]``, the seed drawn from torch's global generator when none is given. Randomness
    is part of the state: the same state and batch always give the same next state, and a saved
    state resumes with the same dropout masks.

    The step completes the structure on first use (:meth:`Step.init`): every slot and metric a
    chain will write exists before its first update.

    Example:
        >>> import looplib as ll
        >>> state = ll.init(torch.nn.Linear(2, 1), ll.optim.sgd(lr=0.1), seed=0)
        >>> sorted(state.params), int(state.step), state.slots["rng"].tolist()
        (['bias', 'weight'], 0, [0, 0])
    """
    if not isinstance(model, nn.Module):
        v.fail("init", "model", "must be a torch.nn.Module", model, exc=TypeError)
    if not isinstance(opt, Optimizer):
        v.fail(
            "init",
            "opt",
            "must be a looplib optimizer such as ll.optim.adam(1e-3)",
            opt,
            exc=TypeError,
        )
    if seed is not None:
        seed = v.nonnegative_int("init", "seed", seed)
        if seed >= 2**63:
            v.fail("init", "seed", "must be a non-negative int below 2**63", seed)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    device = next(iter(params.values())).device if params else torch.device("cpu")
    return TrainState(
        params=params,
        buffers=buffers,
        opt_state=opt.init(params),
        step=torch.zeros((), dtype=torch.int64, device=device),
        metrics={},
        slots={RNG: _random.new_key(seed, device)},
    )


def train_step(
    model: nn.Module,
    loss_fn: Callable[..., Any],
    opt: Optimizer,
    *,
    weight: Callable[[Any], Any] | None = None,
) -> Step:
    """The base pure step: compute the loss's gradient and apply one optimizer update.

    ``loss_fn(model, batch)`` runs with ``model`` reading the state's params and buffers (the
    module is in train mode) and returns the loss, or ``(loss, metrics)``, or a
    :class:`LossOutput`. Under :func:`tbptt_split` it is called as ``loss_fn(model, batch,
    carry)`` and returns ``(loss, metrics, carry)``.

    In plain Python, the step is::

        def step(state, batch):
            loss, grads = value_and_grad(loss_fn)(state.params, batch)
            params, opt_state = opt.update(grads, state.opt_state, state.params)
            return state._replace(params=params, opt_state=opt_state, step=state.step + 1,
                                  metrics={"loss": loss, **metrics, "weight": n_samples})

    Args:
        model: the module; used as a template, never modified.
        loss_fn: ``(model, batch[, carry]) -> loss | (loss, metrics[, carry]) | LossOutput``.
        opt: an optimizer from :mod:`looplib.optim`.
        weight: optional ``batch -> number`` giving the batch's weight for accumulation (default:
            :func:`sample_count`); a loss that returns ``LossOutput(weight=...)`` overrides it.

    Returns:
        a :class:`Step`, to call as ``step(state, batch)`` or to wrap with transformers.

    Example:
        >>> import looplib as ll, torch.nn.functional as F
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = ll.optim.sgd(lr=0.1)
        >>> step = ll.train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), opt)
        >>> state = step(ll.init(model, opt), (torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
        >>> int(state.step), sorted(state.metrics)
        (1, ['loss', 'lr', 'weight'])
    """
    if not isinstance(model, nn.Module):
        v.fail("train_step", "model", "must be a torch.nn.Module", model, exc=TypeError)
    v.is_callable("train_step", "loss_fn", loss_fn, "a function (model, batch) -> loss")
    if not isinstance(opt, Optimizer):
        v.fail(
            "train_step",
            "opt",
            "must be a looplib optimizer such as ll.optim.adam(1e-3)",
            opt,
            exc=TypeError,
        )
    if weight is not None:
        v.is_callable("train_step", "weight", weight, "a function batch -> number or None")
    return Step(model, loss_fn, opt, weight=weight)
