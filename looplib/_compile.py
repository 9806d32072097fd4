"""``compile``: capture a whole step (forward, backward, transformers, optimizer) as one graph."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from . import _validate as v
from ._step import NO_CARRY, Step, weighted_mean
from ._tree import detach
from ._types import Metrics, TrainState

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")

FALLBACK_WARNING = (
    "ll.compile: this step could not be captured as one graph, so it runs eagerly instead "
    "(same results, eager speed). The compiler said: {error}"
)


class CompiledStep:
    """A :class:`Step` whose micro-batch (gradient, transformers and optimizer update) runs as
    one compiled graph. Call it like the step: ``state = compiled(state, batch)``.

    Results equal the eager step's up to floating-point reassociation by the compiler. The graph
    is traced on the first call (and once more for the first chunk's empty carry under
    ``tbptt_split``); the state's structure and dtypes never change, counters are tensors and the
    accumulation window is a tensor select, so later steps reuse the same graph.
    """

    def __init__(
        self, step: Step, *, mode: str | None, donate: bool, options: dict[str, Any]
    ) -> None:
        self.step = step
        self.mode = mode
        self.donate = donate
        self.eager = False
        self.error: str | None = None
        self._grad_keys: tuple[str, ...] | None = None
        self._compiled = torch.compile(self._core, fullgraph=True, mode=mode, **options)

    # Properties of the underlying step, so a compiled step can stand in for it (``fit``).
    @property
    def model(self) -> torch.nn.Module:
        return self.step.model

    def init(self, state: TrainState) -> TrainState:
        return self.step.init(state)

    def flush(self, state: TrainState) -> TrainState:
        return self.step.flush(state)

    def evaluate(self, state: TrainState, batch: Any) -> Metrics:
        return self.step.evaluate(state, batch)

    def __repr__(self) -> str:
        return f"compile({self.step!r}, mode={self.mode!r})"

    def _core(self, state: TrainState, batch: Any, carry: Any) -> tuple[Any, Metrics, Any]:
        new, out = self.step.micro(state, batch, carry)
        # The state leaves as a plain tuple: some compiler releases rebuild NamedTuple outputs
        # of a graph wrongly; it is made a TrainState again outside.
        return tuple(new), out.metrics, out.carry

    def _micro(self, state: TrainState, batch: Any, carry: Any) -> tuple[TrainState, Metrics, Any]:
        fields, metrics, carry = self._micro_fields(state, batch, carry)
        return TrainState(*fields), metrics, carry

    def _micro_fields(self, state: TrainState, batch: Any, carry: Any) -> tuple[Any, Metrics, Any]:
        if not self.eager:
            try:
                if self.donate and self.mode in CUDAGRAPH_MODES:
                    # The previous state is consumed: its buffers may now be replayed into.
                    torch.compiler.cudagraph_mark_step_begin()
                return self._compiled(state, batch, carry)
            except Exception as error:  # the compiler's errors have no common base class
                self.eager = True
                self.error = (
                    f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                )
                warnings.warn(
                    FALLBACK_WARNING.format(error=self.error), RuntimeWarning, stacklevel=3
                )
        return self._core(state, batch, carry)

    def __call__(self, state: TrainState, batch: Any) -> TrainState:
        consumed = self.donate and self.mode in CUDAGRAPH_MODES
        return self.step.call_with(self._run, state, batch, narrow=self._narrow, consumed=consumed)

    def _narrow(self, state: TrainState) -> TrainState:
        # Hand the graph only the metrics a transformer reads back (the tracked norms), so its
        # inputs are the same on every call, before and after the loss metrics exist.
        if self._grad_keys is None:
            self._grad_keys = tuple(self.step.init(state._replace(metrics={})).metrics)
        return state._replace(metrics={k: state.metrics[k] for k in self._grad_keys})

    def _run(self, inputs: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        step = self.step
        if step.split is None:
            new, metrics, _ = self._micro(inputs, batch, NO_CARRY)
        else:
            carry: Any = None
            parts = []
            new = inputs
            for chunk in step.split.split(batch):
                new, part, carry = self._micro(new, chunk, carry)
                carry = detach(carry)
                parts.append(part)
            metrics = weighted_mean(parts)
        return new, metrics


def compile(
    step: Step,
    *,
    mode: str | None = None,
    donate: bool = False,
    **options: Any,
) -> CompiledStep:
    """Compile a whole step with ``torch.compile(fullgraph=True)``.

    Purity is what makes this possible: the forward, the backward (``torch.func.grad_and_value``,
    traced), the gradient transformers and the optimizer update are one function of tensors,
    captured as one graph with no graph breaks. Where a model cannot be captured, the step runs
    eagerly instead, after one ``RuntimeWarning`` (never a crash); ``compiled.eager`` and
    ``compiled.error`` tell what happened.

    CUDA graphs (``mode="reduce-overhead"``) replay into the same output buffers, so each call
    overwrites the previous call's output state. They therefore need ``donate=True``: the caller
    promises not to use a state after passing it to the step (as with JAX's ``donate_argnums``).
    Without CUDA graphs every old state stays valid.

    Args:
        step: a :class:`Step` (``tbptt_split`` steps compile their per-chunk micro-step).
        mode: ``torch.compile``'s mode.
        donate: consume the input state (required by CUDA-graph modes).
        options: other keyword arguments for ``torch.compile`` (e.g. ``dynamic=False``).

    Returns:
        a :class:`CompiledStep`, called like the step.
    """
    if not isinstance(step, Step):
        v.fail(
            "compile", "step", "must be a looplib Step (from ll.train_step)", step, exc=TypeError
        )
    v.one_of("compile", "mode", mode, MODES)
    if not isinstance(donate, bool):
        v.fail("compile", "donate", "must be a bool", donate, exc=TypeError)
    if mode in CUDAGRAPH_MODES and not donate:
        v.fail(
            "compile",
            "mode",
            "uses CUDA graphs, which overwrite the previous output state on every call, so it "
            "needs donate=True",
            mode,
            fix="Pass donate=True and stop using each state once you have passed it to the step, "
            "or use mode='max-autotune-no-cudagraphs'.",
        )
    if step.donate:
        v.fail(
            "compile",
            "step",
            "must not be a donating step (ll.donate): a compiled step selects between the "
            "updated and the held state with torch.where, which in-place updates would defeat",
            step,
            fix="Compile the pure step; pass donate=True to compile for CUDA graphs.",
        )
    return CompiledStep(step, mode=mode, donate=donate, options=options)
