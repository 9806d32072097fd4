"""``compile``: capture a whole update (forward, backward, transformers, optimizer) as one graph."""

from __future__ import annotations

import contextlib
import itertools
import types
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import optree
import torch

from . import _validate as v
from ._fold import own
from ._step import Step
from ._types import Metrics, TrainState

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
FALLBACKS = ("raise", "eager")

NOT_CAPTURED = (
    "ll.compile: {step!r} cannot be captured as one graph. The compiler said: {error}\n"
    "Change the model or loss so the compiler can trace it (torch.compile(fullgraph=True) "
    "must accept it), or pass ll.compile(step, fallback='eager') to run this step eagerly "
    "instead, at eager speed, after one warning."
)
FALLBACK_WARNING = (
    "ll.compile(..., fallback='eager'): this step could not be captured as one graph, so it "
    "runs eagerly instead (same results, eager speed). The compiler said: {error}"
)


class CompileError(RuntimeError):
    """Raised at the first call of a compiled step the compiler cannot capture."""


RECOMPILE_LIMIT = 64
"""Graphs one compiled step may hold: one per kind of call (window position, batch shapes)."""


def _settings() -> contextlib.AbstractContextManager[Any]:
    """The compiler settings of a compiled step's calls: ``torch.autograd.grad`` traced into the
    graph (torch >= 2.11), and room for a graph per kind of call."""
    changes: dict[str, Any] = {"recompile_limit": RECOMPILE_LIMIT}
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):
        changes["trace_autograd_ops"] = True
    return torch._dynamo.config.patch(**changes)


def _own_code(fn: Any) -> Any:
    """``fn`` with a code object of its own: the compiler keeps its cache, and counts its
    recompile limit, per code object, so every compiled step needs its own."""
    code = fn.__func__.__code__
    fresh = types.FunctionType(
        code.replace(co_name=f"{code.co_name}_{next(_SERIAL)}"),
        fn.__func__.__globals__,
        closure=fn.__func__.__closure__,
    )
    return types.MethodType(fresh, fn.__self__)


_SERIAL = itertools.count()


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}"


class _Captured(NamedTuple):
    graph: Any
    state: TrainState
    batches: Any


def _layout(tree: Any) -> Any:
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=True)
    return spec, tuple(
        (x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in leaves
    )


def _copy_into(targets: Any, sources: Any) -> None:
    for t, s in zip(optree.tree_leaves(targets), optree.tree_leaves(sources), strict=True):
        if isinstance(t, torch.Tensor) and t is not s:
            t.copy_(s)


class CompiledStep:
    """A :class:`Step` whose updates run as compiled graphs. Call it like the step, or hand it
    to ``fold``/``fit``, which call it once per optimizer update.

    Results equal the eager step's up to floating-point reassociation by the compiler, dropout
    masks included (they are drawn from the state's key by plain tensor arithmetic). One graph
    is traced per kind of call: a whole window of ``accumulate(k)`` (``fold``/``fit``), a
    smaller last window or batch, a lone ``compiled(state, batch)``. The state's structure never
    changes, so later calls reuse them.
    """

    def __init__(
        self, step: Step, *, mode: str | None, donate: bool, fallback: str, options: dict[str, Any]
    ) -> None:
        self.step = step
        self.mode = mode
        self.donate = donate
        self.fallback = fallback
        self.eager = False
        self.error: str | None = None
        inductor: dict[str | None, str | None] = {
            "reduce-overhead": None,
            "max-autotune": "max-autotune-no-cudagraphs",
        }
        self._compiled = torch.compile(
            _own_code(self._graph), fullgraph=True, mode=inductor.get(mode, mode), **options
        )
        self._captured: dict[Any, _Captured] | None = {} if mode in CUDAGRAPH_MODES else None
        self._anchors: dict[torch.device, torch.Tensor] = {}

    # The step's other parts, so a compiled step stands in for it.
    @property
    def model(self) -> torch.nn.Module:
        return self.step.model

    @property
    def window(self) -> int:
        return self.step.window

    @property
    def split(self) -> Any:
        return self.step.split

    @property
    def stages(self) -> Any:
        return self.step.stages

    def init(self, state: TrainState, batch: Any = None) -> TrainState:
        return self.step.init(state, batch) if batch is not None else self.step.init(state)

    def flush(self, state: TrainState) -> TrainState:
        return self.step.flush(state)

    def evaluate(self, state: TrainState, batch: Any) -> Metrics:
        return self.step.evaluate(state, batch)

    def chunks(self, batch: Any) -> Sequence[Any]:
        return self.step.chunks(batch)

    def position(self, state: TrainState) -> int:
        return self.step.position(state)

    def groups(self, batches: Iterable[Any], position: int) -> Iterator[tuple[list[Any], int]]:
        return self.step.groups(batches, position)

    def check(self, state: TrainState) -> None:
        self.step.check(state)

    def check_structure(self, state: TrainState, func: str = "step") -> None:
        self.step.check_structure(state, func)

    def check_output(self, before: TrainState, after: TrainState) -> None:
        self.step.check_output(before, after)

    def __repr__(self) -> str:
        return f"compile({self.step!r}, mode={self.mode!r})"

    # -- running -----------------------------------------------------------------------------
    def _graph(
        self,
        state: TrainState,
        batches: Sequence[Any],
        start: int | None,
        donate: bool,
        anchor: torch.Tensor,
    ) -> tuple[Any, ...]:
        # A plain tuple out of the graph: some compiler releases rebuild NamedTuples wrongly.
        return tuple(self.step.run(state, batches, start, donate, anchor))

    def _anchor(self, state: TrainState) -> torch.Tensor:
        """The zero the compiled step takes gradients through (see ``leaves_of``)."""
        device = state.step.device
        if device not in self._anchors:
            self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return self._anchors[device]

    def _call(
        self, state: TrainState, batches: Sequence[Any], start: int | None, donate: bool
    ) -> TrainState:
        if self.eager:
            return self.step.run(state, batches, start, donate)
        try:
            with _settings():
                anchor = self._anchor(state)
                return TrainState(*self._compiled(state, list(batches), start, donate, anchor))
        except Exception as error:  # the compiler's errors share no base class
            # An error of the step itself (a bad batch, a bug in the loss) fails eagerly too,
            # and is then reported as it is, not as the compiler's.
            eager = self.step.run(state, batches, start, donate)
            self.error = _reason(error)
            if self.fallback == "raise":
                raise CompileError(NOT_CAPTURED.format(step=self.step, error=self.error)) from error
            self.eager = True
            warnings.warn(FALLBACK_WARNING.format(error=self.error), RuntimeWarning, stacklevel=4)
            return eager

    def run(
        self,
        state: TrainState,
        batches: Sequence[Any],
        start: int | None = None,
        donate: bool = False,
    ) -> TrainState:
        """:meth:`Step.run`, compiled (and replayed as a CUDA graph in the CUDA-graph modes)."""
        if self._captured is None or self.eager:
            return self._call(state, batches, start, donate or self.donate)
        return self._replay(state, batches, start)

    def __call__(self, state: TrainState, batch: Any) -> TrainState:
        state = self.step.init(state, batch)
        self.step.check_structure(state)
        new = self.run(state, (batch,))
        self.step.check_output(state, new)
        return new

    def _replay(self, state: TrainState, batches: Sequence[Any], start: int | None) -> TrainState:
        """Run the update as a CUDA graph over fixed buffers, captured on the first call of each
        kind; the state is donated: the buffers returned are those the next call updates."""
        assert self._captured is not None
        key = (start, _layout(list(batches)))
        entry = self._captured.get(key)
        if entry is None:
            entry = self._capture(state, list(batches), start)
            if self.eager:
                return entry.state
            self._captured[key] = entry
        else:
            if state is not entry.state:
                _copy_into(entry.state, state)
            _copy_into(entry.batches, list(batches))
        entry.graph.replay()
        return entry.state

    def _capture(self, state: TrainState, batches: list[Any], start: int | None) -> _Captured:
        static = own(state)
        inputs = own(batches)  # type: ignore[arg-type]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compile and warm up on scratch copies
                self._call(own(static), inputs, start, True)
        torch.cuda.current_stream().wait_stream(side)
        if self.eager:  # the fallback took over while warming up
            return _Captured(None, self.step.run(state, batches, start, True), inputs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._call(static, inputs, start, True)
            _copy_into(static, out)
        return _Captured(graph, static, inputs)


def compile(
    step: Step,
    *,
    mode: str | None = None,
    donate: bool = False,
    fallback: str = "raise",
    **options: Any,
) -> CompiledStep:
    """Compile a whole update with ``torch.compile(fullgraph=True)``.

    Purity is what makes this possible: the forward, the backward (``torch.autograd.grad`` in
    the graph), the gradient transformers and the optimizer are one function of tensors, with
    no host reads, captured as one graph with no graph breaks. ``fold`` and ``fit`` call it once
    per optimizer update: all ``k`` micro-batches of an ``accumulate(k)`` window are in the one
    graph. A batch of another size (say, the last) gets a graph of its own, or shapes made
    dynamic by the compiler after the first change; it never drops the run to eager.

    A step the compiler cannot capture raises :class:`CompileError` at its first call, with the
    compiler's reason; ``fallback="eager"`` runs it eagerly instead, after one warning
    (``compiled.eager`` and ``compiled.error`` tell what happened). No failure leaves the eager
    step unusable.

    CUDA graphs (``mode="reduce-overhead"`` or ``"max-autotune"``) need ``donate=True``: the
    update is captured once per kind of call and replayed over fixed buffers that it updates in
    place, so the state a call returns is those buffers, and the state passed in is consumed
    (JAX's ``donate_argnums``). Without CUDA graphs every old state stays valid.

    Args:
        step: a :class:`Step`.
        mode: ``torch.compile``'s mode; the CUDA-graph modes are captured by looplib over its
            own buffers (see above).
        donate: consume the input state (required by the CUDA-graph modes).
        fallback: ``"raise"`` (default) or ``"eager"``, for a step that cannot be captured.
        options: other keyword arguments for ``torch.compile`` (e.g. ``dynamic=False``).

    Returns:
        a :class:`CompiledStep`, called like the step.
    """
    if not isinstance(step, Step):
        v.fail(
            "compile", "step", "must be a looplib Step (from ll.train_step)", step, exc=TypeError
        )
    v.one_of("compile", "mode", mode, MODES)
    v.one_of("compile", "fallback", fallback, FALLBACKS)
    if not isinstance(donate, bool):
        v.fail("compile", "donate", "must be a bool", donate, exc=TypeError)
    if mode in CUDAGRAPH_MODES and not donate:
        v.fail(
            "compile",
            "mode",
            "uses CUDA graphs, which update fixed buffers in place on every call, so it needs "
            "donate=True",
            mode,
            fix="Pass donate=True and stop using each state once you have passed it to the step, "
            "or use mode='max-autotune-no-cudagraphs'.",
        )
    return CompiledStep(step, mode=mode, donate=donate, fallback=fallback, options=options)
