"""The pure training step: ``(state, batch) -> state``.

A :class:`Step` is made by :func:`train_step` and reshaped by transformers. It has three parts,
each a pure function, and its call threads one batch through them::

    def step(state, batch):
        state = step.init(state)                       # add transformer slots (idempotent)
        for chunk, carry in split(batch):              # one chunk unless tbptt_split is used
            grads, weight, metrics, buffers, carry = gradient(state, chunk, carry)
            state = apply(state._replace(buffers=buffers), grads, weight)
        return state._replace(metrics=state.metrics | metrics)

``gradient`` runs the loss with the state's params and buffers swapped into the module (the
same dictionary swaps ``torch.func.functional_call`` makes, with the slots found once when the
step is built) and takes gradients with ``torch.autograd.grad`` on detached aliases of the params:
fast, and it works with the fused RNN kernels. Under ``torch.compile`` it uses
``functional_call`` and ``torch.func.grad_and_value`` instead, which the compiler traces.
``apply`` is the chain of gradient stages (``accumulate``, ``track_norm``, ``clip``, ...) ending
in the optimizer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from . import _validate as v
from ._rng import SLOT as RNG
from ._rng import rng_scope, rng_slot
from ._swap import Swapper
from ._tree import detach, grads_dict, shapes_only, structure_difference, without_metrics
from ._types import Metrics, Optimizer, Params, Tensor, TrainState, describe

ApplyFn = Callable[[TrainState, Params, Tensor], TrainState]
"""``apply(state, grads, weight) -> state``: consume one gradient (the weighted mean gradient of
``weight`` samples)."""

NO_CARRY: Any = object()
"""Sentinel: the loss function takes no carry (``loss_fn(model, batch)``)."""

STRUCTURE_HELP = (
    "A step must return a state with exactly the structure, shapes and dtypes it received; "
    "check the transformer or loss function that writes this entry."
)


class LossOutput(NamedTuple):
    """What a loss function may return, in full.

    A loss function may also return just the loss tensor, ``(loss, metrics)`` or
    ``(loss, metrics, carry)``; missing parts default to no metrics, no carry, and the batch's
    sample count as the weight.

    Attributes:
        loss: a 0-d tensor, the mean loss over the batch's samples (or tokens, see ``weight``).
        metrics: a dict of 0-d tensors to report, averaged by ``weight`` over micro-batches.
        carry: the hidden state to hand to the next chunk under :func:`tbptt_split`.
        weight: how many units the mean ``loss`` averages over (samples, non-padding tokens);
            accumulation weights each micro-batch's gradient by it. ``None`` means the sample
            count of the batch.
    """

    loss: Tensor
    metrics: Mapping[str, Tensor] | None = None
    carry: Any = None
    weight: Tensor | float | int | None = None


class Stage(NamedTuple):
    """A gradient stage: a transformer that acts between the gradient and the optimizer.

    ``wrap(inner) -> apply`` builds this stage's ``apply`` around the ``apply`` of the stages
    after it. ``init(state) -> state`` adds the stage's slot (and any metrics it reports) if they
    are missing, and leaves them alone otherwise. ``flush(state, inner) -> state`` ends a pending
    accumulation window (only :func:`accumulate` has one). ``after(state)`` runs on the host
    after every call of the step, outside any compiled graph (e.g. to raise on a counter).

    While ``apply`` runs, ``state.metrics`` already holds the current micro-batch's loss metrics.
    """

    name: str
    wrap: Callable[[ApplyFn], ApplyFn]
    init: Callable[[TrainState], TrainState] | None = None
    flush: Callable[[TrainState, ApplyFn], TrainState] | None = None
    slot: str | None = None
    after: Callable[[TrainState], None] | None = None


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


@functools.lru_cache(maxsize=256)
def _weight_tensor(count: int) -> Tensor:
    """One shared 0-d tensor per sample count: building a tensor costs more than the rest of
    the bookkeeping of a small step, and nothing ever writes into these."""
    return torch.tensor(float(count))


class _Bound(nn.Module):
    """Runs the user's loss on the template module inside ``functional_call``."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any, carry: Any) -> Any:
        return call_loss(self._loss_fn, self.model, batch, carry)


def call_loss(loss_fn: Callable[..., Any], model: nn.Module, batch: Any, carry: Any) -> Any:
    if carry is NO_CARRY:
        return loss_fn(model, batch)
    return loss_fn(model, batch, carry)


def _none_if_empty(x: Any) -> Any:
    return None if isinstance(x, tuple) and not x else x


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


class Step:
    """A pure training step, ``(state, batch) -> state``; build one with :func:`train_step`.

    Calling it never changes any tensor of the state it receives, and returns a state with the
    same structure, shapes and dtypes (``metrics`` is filled on the first call). Transformers
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
    ) -> None:
        self.model = model
        self.donate = donate
        self.loss_fn = loss_fn
        self.opt = opt
        self.weight = weight
        self.stages = stages
        self.split = split
        self._bound = _Bound(model, loss_fn)
        self._swapper = Swapper(model)
        self._names = [f"model.{name}" for name, _ in model.named_parameters()]
        self._buffer_names = [f"model.{name}" for name, _ in model.named_buffers()]
        # Each stage's apply wraps the applies of the stages after it; keep, per stage, what it
        # hands the gradient to (flush needs it) and the outermost apply.
        apply: ApplyFn = self._optimizer_apply
        inners: list[ApplyFn] = []
        for stage in reversed(stages):
            inners.append(apply)
            apply = stage.wrap(apply)
        self._inners: list[ApplyFn] = inners[::-1]
        self.apply: ApplyFn = apply
        self._checked: set[Any] = set()
        self._reference: Any = None

    # -- construction ----------------------------------------------------------------------
    def replace(
        self,
        *,
        stages: tuple[Stage, ...] | None = None,
        split: Split | None = None,
        donate: bool | None = None,
    ) -> Step:
        return Step(
            self.model,
            self.loss_fn,
            self.opt,
            weight=self.weight,
            stages=self.stages if stages is None else stages,
            split=self.split if split is None else split,
            donate=self.donate if donate is None else donate,
        )

    def __repr__(self) -> str:
        parts = ([self.split.name] if self.split else []) + [s.name for s in self.stages]
        inner = f"train_step({type(self.model).__name__}, {getattr(self.loss_fn, '__name__', 'loss_fn')})"
        if self.donate:
            inner = f"donate({inner})"
        return f"chain({', '.join(parts)})({inner})" if parts else inner

    # -- the pure parts --------------------------------------------------------------------
    def init(self, state: TrainState) -> TrainState:
        """Add the slots (and reported metrics) of this step's transformers, where missing."""
        for stage in self.stages:
            if stage.init is not None:
                state = stage.init(state)
        return state

    def _run_loss(
        self, params: list[Tensor], buffers: list[Tensor], batch: Any, carry: Any
    ) -> LossOutput:
        if torch.compiler.is_compiling():
            tensors: dict[str, Tensor] = dict(zip(self._names, params, strict=True))
            tensors.update(zip(self._buffer_names, buffers, strict=True))
            raw = torch.func.functional_call(self._bound, tensors, (batch, carry), strict=True)
        else:
            raw, buffers[:] = self._swapper.call(
                params, buffers, lambda: call_loss(self.loss_fn, self.model, batch, carry)
            )
        return _as_loss_output(raw)

    def _metrics(self, out: LossOutput, batch: Any) -> Metrics:
        if out.weight is not None:
            weight = torch.as_tensor(out.weight, dtype=torch.float32).detach()
        elif self.weight is not None:
            weight = torch.as_tensor(self.weight(batch), dtype=torch.float32)
        elif torch.compiler.is_compiling():
            weight = torch.tensor(float(sample_count(batch)))
        else:
            weight = _weight_tensor(sample_count(batch))
        metrics = {"loss": out.loss.detach()}
        for key, value in (out.metrics or {}).items():
            if key in ("loss", "weight"):
                v.fail(
                    "train_step",
                    "loss_fn",
                    "must not return a metric named 'loss' or 'weight' (looplib reports those)",
                    key,
                )
            metrics[key] = torch.as_tensor(value).detach()
        metrics["weight"] = weight
        return metrics

    def gradient(self, state: TrainState, batch: Any, carry: Any = NO_CARRY) -> GradOut:
        """Run the loss on ``batch`` and return its gradient with respect to ``state.params``."""
        buffers = [b.clone() for b in state.buffers.values()]
        if not self.model.training:
            self.model.train()
        if torch.compiler.is_compiling():
            grads, out = self._traced_gradient(list(state.params.values()), buffers, batch, carry)
        else:
            leaves = [p.detach().requires_grad_(True) for p in state.params.values()]
            with torch.enable_grad():
                out = self._run_loss(leaves, buffers, batch, carry)
            grads = torch.autograd.grad(out.loss, leaves, allow_unused=True, materialize_grads=True)
        metrics = self._metrics(out, batch)
        if buffers:
            # A micro-batch whose loss is not finite leaves the buffers as they were, so one bad
            # batch cannot poison BatchNorm's running statistics (a select, no host sync).
            ok = torch.isfinite(metrics["loss"]).all()
            buffers = [
                torch.where(ok, new, old)
                for new, old in zip(buffers, state.buffers.values(), strict=True)
            ]
        return GradOut(
            grads_dict(zip(state.params.keys(), grads, strict=True)),
            metrics["weight"],
            metrics,
            dict(zip(state.buffers.keys(), buffers, strict=True)),
            out.carry,
        )

    def _traced_gradient(
        self, params: list[Tensor], buffers: list[Tensor], batch: Any, carry: Any
    ) -> tuple[Sequence[Tensor], LossOutput]:
        """The gradient as the compiler traces it: ``torch.func.grad_and_value`` (fresh leaves
        made with ``requires_grad_`` cannot be traced). The buffers go in as inputs of the
        transformed function, so a module may update them in place (BatchNorm)."""

        def loss_of(params: list[Tensor], buffers: list[Tensor]) -> tuple[Tensor, Any]:
            out = self._run_loss(params, buffers, batch, carry)
            # The transform's outputs must be tensors: () stands for None.
            weight = () if out.weight is None else torch.as_tensor(out.weight)
            new_carry = () if out.carry is None else out.carry
            return out.loss.reshape(()), (dict(out.metrics or {}), new_carry, weight, out.loss)

        grads, (_, (metrics, new_carry, weight, loss)) = torch.func.grad_and_value(
            loss_of, has_aux=True
        )(params, buffers)
        return grads, LossOutput(loss, metrics, _none_if_empty(new_carry), _none_if_empty(weight))

    def evaluate(self, state: TrainState, batch: Any) -> Metrics:
        """The loss metrics of one batch in eval mode, without gradients (as tensors).

        Under ``tbptt_split`` the batch runs chunk by chunk with the carry, as in training, and
        the metrics are averaged over the chunks by weight. Never changes ``state``.
        """
        if self.model.training:
            self.model.eval()
        try:
            with torch.no_grad():
                buffers = [b.clone() for b in state.buffers.values()]
                params = list(state.params.values())
                if self.split is None:
                    return self._metrics(self._run_loss(params, buffers, batch, NO_CARRY), batch)
                carry: Any = None
                parts = []
                for chunk in self.split.split(batch):
                    out = self._run_loss(params, buffers, chunk, carry)
                    carry = out.carry
                    parts.append(self._metrics(out, chunk))
                return weighted_mean(parts)
        finally:
            self.model.train()

    def _optimizer_apply(self, state: TrainState, grads: Params, weight: Tensor) -> TrainState:
        if self.donate and self.opt.update_ is not None:
            params, opt_state = self.opt.update_(grads, state.opt_state, state.params)
        else:
            params, opt_state = self.opt.update(grads, state.opt_state, state.params)
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1)

    def micro(
        self, state: TrainState, batch: Any, carry: Any = NO_CARRY
    ) -> tuple[TrainState, GradOut]:
        """One micro-batch: gradient, then the gradient stages and the optimizer."""
        out = self.gradient(state, batch, carry)
        state = state._replace(buffers=out.buffers, metrics={**state.metrics, **out.metrics})
        return self.apply(state, out.grads, out.weight), out

    def flush(self, state: TrainState) -> TrainState:
        """End any pending accumulation window by its ``partial`` policy (see ``accumulate``)."""
        state = self.init(state)
        for stage, inner in zip(self.stages, self._inners, strict=True):
            if stage.flush is not None:
                state = stage.flush(state, inner)
        return state

    # -- the call --------------------------------------------------------------------------
    def __call__(self, state: TrainState, batch: Any) -> TrainState:
        return self.call_with(self._run, state, batch)

    def call_with(
        self,
        run: Callable[[TrainState, Any], tuple[TrainState, Metrics]],
        state: TrainState,
        batch: Any,
        narrow: Callable[[TrainState], TrainState] | None = None,
        consumed: bool = False,
    ) -> TrainState:
        """The call around the computation ``run(state, batch) -> (state, loss metrics)``: add
        the slots, scope the random generators, merge the metrics, check the structure and run the
        stages' host-side checks. ``narrow`` trims the state handed to ``run`` (a compiled run
        takes only the metrics a transformer reads back). ``consumed`` says ``run`` invalidates
        its input's tensors (CUDA-graph replays overwrite them), so the structure is checked
        against shapes and dtypes recorded before the first run instead."""
        if not isinstance(state, TrainState):
            v.fail(
                "step", "state", "must be a looplib TrainState (from ll.init)", state, exc=TypeError
            )
        start = self.init(state)
        inputs = start if narrow is None else narrow(start)
        if consumed and self._reference is None:
            self._reference = shapes_only(without_metrics(start))
        if RNG in start.slots:
            with rng_scope(start.slots[RNG], start.step.device) as rng:
                new, metrics = run(inputs, batch)
            new = new._replace(slots={**new.slots, RNG: rng.value})
        else:
            new, metrics = run(inputs, batch)
        new = new._replace(metrics={**start.metrics, **new.metrics, **metrics})
        self._check(start, new, self._reference if consumed else None)
        self.after(new)
        return new

    def _run(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if self.split is None:
            new, out = self.micro(state, batch)
            return new, out.metrics
        return self._run_chunks(state, batch)

    def after(self, state: TrainState) -> None:
        """Run the host-side checks of the stages (see :class:`Stage`)."""
        for stage in self.stages:
            if stage.after is not None:
                stage.after(state)

    def _run_chunks(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        assert self.split is not None
        carry: Any = None
        parts = []
        for chunk in self.split.split(batch):
            state, out = self.micro(state, chunk, carry)
            carry = detach(out.carry)
            parts.append(out.metrics)
        return state, weighted_mean(parts)

    def _check(self, before: TrainState, after: TrainState, reference: Any = None) -> None:
        """Check that ``after`` has the structure, shapes and dtypes of ``before``.

        The full check (every leaf) runs once for each way a call can go: keyed by the metric
        names, the slot names, the number of params, and whether an update was applied
        (``state.step`` replaced) or held back (an accumulation window still open, a skipped
        step). A path that runs only on some calls is checked the first time it runs; later
        calls along a checked path cost a few attribute reads.
        """
        key = (
            tuple(after.metrics),
            tuple(after.slots),
            len(after.params),
            len(after.buffers),
            after.step is before.step,
        )
        if key in self._checked:
            return
        fresh = "loss" not in before.metrics
        if reference is None:
            bad = structure_difference(without_metrics(before), without_metrics(after))
        else:
            bad = structure_difference(reference, shapes_only(without_metrics(after)))
        if bad is None and not fresh and set(before.metrics) != set(after.metrics):
            bad = f"state.metrics keys changed from {sorted(before.metrics)} to {sorted(after.metrics)}"
        if bad is None:
            for name, value in after.metrics.items():
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    bad = f"state.metrics[{name!r}] must be a one-element tensor, got {describe(value)}"
                    break
        if bad is not None:
            raise ValueError(f"{self!r}: {bad}. {STRUCTURE_HELP}")
        self._checked.add(key)


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


def donate(step: Step) -> Step:
    """The same step, consuming its input state: the optimizer writes the new params and
    optimizer state into the input's tensors instead of new ones.

    This is the donation contract of JAX's ``donate_argnums``, for eager PyTorch: the caller
    promises not to use a state again once it has passed it to the step (``state = step(state,
    batch)`` keeps that promise; keeping old states around does not). In exchange an update
    allocates no parameter-sized memory beyond the optimizer's temporaries, so peak memory is
    close to a hand-written loop's. Results are bit for bit those of the pure step. Optimizers
    without an in-place form (``update_``) update out of place as usual.

    Example:
        >>> import looplib as ll
        >>> model, opt = torch.nn.Linear(2, 1), ll.optim.sgd(lr=0.1)
        >>> step = ll.donate(ll.train_step(model, lambda m, b: m(b).pow(2).mean(), opt))
        >>> state = ll.init(model, opt)
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
    untouched and serves as a template), the optimizer's fresh state, ``step = 0`` and empty
    ``metrics`` and ``slots``.

    With a ``seed``, the random numbers the step draws (dropout) come from generator states kept
    in ``state.slots["rng"]`` instead of torch's global generator: the step sets the global
    generator from the state, runs, stores the advanced generator state in the new state and
    restores the caller's. Randomness is then part of the state, so a saved state resumes with the
    same dropout masks, and a step on the same state and batch always gives the same result.

    Example:
        >>> import looplib as ll
        >>> state = ll.init(torch.nn.Linear(2, 1), ll.optim.sgd(lr=0.1))
        >>> sorted(state.params), int(state.step)
        (['bias', 'weight'], 0)
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
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    device = next(iter(params.values())).device if params else torch.device("cpu")
    return TrainState(
        params=params,
        buffers=buffers,
        opt_state=opt.init(params),
        step=torch.zeros((), dtype=torch.int64, device=device),
        metrics={},
        slots={} if seed is None else {RNG: rng_slot(seed, device)},
    )


def train_step(
    model: nn.Module,
    loss_fn: Callable[..., Any],
    opt: Optimizer,
    *,
    weight: Callable[[Any], Any] | None = None,
) -> Step:
    """The base pure step: compute the loss's gradient and apply one optimizer update.

    ``loss_fn(model, batch)`` runs with ``model`` reading the state's params and buffers (through
    ``torch.func.functional_call``; the module is in train mode) and returns the loss, or
    ``(loss, metrics)``, or a :class:`LossOutput`. Under :func:`tbptt_split` it is called as
    ``loss_fn(model, batch, carry)`` and returns ``(loss, metrics, carry)``.

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
        (1, ['loss', 'weight'])
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
