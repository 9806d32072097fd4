"""``epoch``: one pass over a stream of batches, the epoch's running metrics kept in the state."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from . import _validate as v
from ._compile import CompiledStep
from ._fold import own
from ._guard import guard as guard_stage
from ._step import Step
from ._tally import SLOT as TALLY
from ._tally import reset as reset_tally
from ._tally import tally
from ._types import TrainState, describe

AnyStep = Step | CompiledStep
After = Callable[[TrainState, int], bool | None]

# The step with the tally (and the guard) added, made once per step object: a compiled step keeps
# its graphs, and a step its learnt structure, from one epoch to the next.
_PREPARED: weakref.WeakKeyDictionary[Any, dict[bool, AnyStep]] = weakref.WeakKeyDictionary()


def prepare(step: AnyStep, guard: bool) -> AnyStep:
    """``step`` with the non-finite guard (when ``guard``) and the tally as its last stages."""
    cache = _PREPARED.setdefault(step, {})
    if guard not in cache:
        extra = (guard_stage(), tally()) if guard else (tally(),)
        if isinstance(step, CompiledStep):
            inner = step.step.replace(stages=(*step.step.stages, *extra))
            cache[guard] = CompiledStep(
                inner, mode=step.mode, donate=step.donate, fallback=step.fallback, options={}
            )
        else:
            cache[guard] = step.replace(stages=(*step.stages, *extra))
    return cache[guard]


def check_step(func: str, step: Any) -> None:
    if not isinstance(step, (Step, CompiledStep)):
        v.fail(func, "step", "must be a looplib Step (from ll.train_step)", step, exc=TypeError)


def layout(batch: Any, depth: int = 0) -> str:
    """A batch's structure for error notes: containers as written, tensors by shape and dtype.

    >>> layout((torch.zeros(8, 3), {"y": torch.zeros(8, dtype=torch.int64)}))
    "(Tensor(shape=(8, 3), dtype=torch.float32), {'y': Tensor(shape=(8,), dtype=torch.int64)})"
    """
    if isinstance(batch, torch.Tensor):
        return describe(batch)
    if depth >= 4:
        return "..."
    if isinstance(batch, Mapping):
        items = [f"{k!r}: {layout(x, depth + 1)}" for k, x in list(batch.items())[:6]]
        more = [f"... ({len(batch)} entries)"] if len(batch) > 6 else []
        return "{" + ", ".join(items + more) + "}"
    if isinstance(batch, (list, tuple)):
        items = [layout(x, depth + 1) for x in batch[:6]]
        more = [f"... ({len(batch)} items)"] if len(batch) > 6 else []
        text = ", ".join(items + more)
        if isinstance(batch, list):
            return f"[{text}]"
        name = type(batch).__name__ if hasattr(batch, "_fields") else ""
        return f"{name}({text}{',' if len(batch) == 1 and not name else ''})"
    return describe(batch, 40)


class Where:
    """Where the batches of a run are, for the notes on an error: who runs them (``"fit"``),
    the context (``"epoch 3, "``) and the place and layout of the run's first batch."""

    def __init__(self, func: str = "epoch", context: str = "") -> None:
        self.func = func
        self.context = context
        self.first: tuple[str, str] | None = None  # (where, layout)

    def place(self, index: int, size: int) -> str:
        which = f"batch {index}" if size == 1 else f"batches {index}-{index + size - 1}"
        return f"{self.context}{which}"

    def note(self, index: int, group: list[Any]) -> str:
        shown = layout(group[0])
        text = f"{self.func}: while training on {self.place(index, len(group))}: {shown}"
        if self.first is not None and self.first[1] != shown:
            text += f"; the first batch of this run ({self.first[0]}) was {self.first[1]}"
        return text + "."


def run_epoch(
    step: AnyStep,
    state: TrainState,
    batches: Iterable[Any],
    *,
    reset: bool,
    flush: bool,
    after: After | None,
    where: Where,
    start: int = 0,
    prepare_state: Callable[[TrainState], TrainState] | None = None,
) -> tuple[TrainState, int]:
    """:func:`epoch`'s work on a prepared step; returns the state and the batches run.

    ``start`` numbers the first batch (a resumed epoch's position) for the notes;
    ``prepare_state`` runs once on the completed state before the first update (``fit``
    broadcasts it from rank 0 there).
    """
    stream = iter(batches)
    first = next(stream, _END)
    if first is _END:
        return state, 0
    step.check_structure(state, where.func)
    try:
        state = step.init(state, first)
    except Exception as e:
        v.add_note(e, where.note(start, [first]))
        raise
    step.check_structure(state, where.func)
    if prepare_state is not None:
        state = prepare_state(state)
    work = own(state)
    if reset:
        work = reset_tally(work)
    done = 0
    ended = False
    position = step.position(work)
    for group, at in step.groups(itertools.chain([first], stream), position):
        index = start + done
        try:
            new = step.run(work, group, at, donate=True)
            if done == 0:  # every path a window can take runs in its first call
                step.check_output(state, new)
        except Exception as e:
            v.add_note(e, where.note(index, group))
            raise
        if where.first is None:
            where.first = (where.place(index, 1), layout(first))
        work = new
        done += len(group)
        if after is not None and after(work, start + done):
            ended = True
            break
    if flush and not ended:
        work = step.flush(work)
    return work, done


_END: Any = object()


def epoch(
    step: AnyStep,
    state: TrainState,
    batches: Iterable[Any],
    *,
    reset: bool = True,
    flush: bool = True,
    guard: bool = True,
    after: After | None = None,
) -> TrainState:
    """One pass of ``step`` over ``batches``, with the pass's metric sums kept in the state.

    The pure epoch that :func:`fit` runs, for loops of your own. In plain Python::

        state = step.init(state, first_batch)              # complete the structure
        if reset:
            state = zero(state.slots["tally"])             # the epoch's sums
        for group in whole_accumulation_windows(batches):
            state = step.run(state, group)                 # sums += this update's metrics
            if after is not None and after(state, batches_run):
                return state                               # ended early: no flush
        state = step.flush(state) if flush else state      # the partial window's policy
        step.check(state)                                  # raise on a refused update
        return state

    The sums live in ``state.slots["tally"]`` (a pytree: a checkpoint taken mid-epoch holds
    them), over the updates actually applied: ``state.slots["tally"].means()`` gives the
    epoch's averages as tensors, loss-side metrics weighted by samples (or the loss's weights),
    the others (learning rate, gradient norms) per update. The step reads nothing on the host;
    the epoch reads only where ``after`` does, and once at the end for the checks.

    With ``guard`` (the default) an update whose loss is not finite, or that would make a param
    or an optimizer value non-finite, is never applied; the state then stays at the last good
    update, and the final check raises :class:`NonFiniteLossError` with it (see
    ``skip_nonfinite`` to skip such updates and go on instead).

    The state passed in is never written: the epoch copies it once, then lets the optimizer
    update its own copies in place. A state that ``after`` receives is updated in place by the
    next window: read it, save it or copy it there, but do not keep it.

    Args:
        step: a :class:`Step` (or compiled step).
        state: the state to start from.
        batches: an iterable of batches (a generator is fine: it is read once).
        reset: start the sums from zero; ``False`` continues the sums in the state (a resumed
            epoch).
        flush: end an open accumulation window at the end (``step.flush``); ``False`` leaves
            it open.
        guard: refuse non-finite updates (see above).
        after: ``after(state, batches_run) -> bool``, called after every whole accumulation
            window (one batch without ``accumulate``); returning True ends the epoch there.

    Returns:
        the state after the pass.

    Example:
        >>> import looplib as ll
        >>> model, opt = torch.nn.Linear(2, 1), ll.optim.sgd(lr=0.1)
        >>> step = ll.train_step(model, lambda m, b: m(b).pow(2).mean(), opt)
        >>> state = ll.epoch(step, ll.init(model, opt), [torch.ones(4, 2)] * 3)
        >>> int(state.step), int(state.slots["tally"].updates), sorted(state.slots["tally"].means())
        (3, 3, ['loss', 'lr'])
    """
    check_step("epoch", step)
    v.train_state("epoch", state)
    if not isinstance(batches, Iterable):
        v.fail("epoch", "batches", "must be an iterable of batches", batches, exc=TypeError)
    for name, value in (("reset", reset), ("flush", flush), ("guard", guard)):
        if not isinstance(value, bool):
            v.fail("epoch", name, "must be a bool", value, exc=TypeError)
    if after is not None:
        v.is_callable("epoch", "after", after, "a function (state, batches_run) -> bool, or None")
    prepared = prepare(step, guard)
    state, _ = run_epoch(
        prepared, state, batches, reset=reset, flush=flush, after=after, where=Where()
    )
    if TALLY in state.slots:
        prepared.check(state)
    return state
