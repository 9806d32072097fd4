"""Transformers: functions from a :class:`Step` to a :class:`Step`, and ``chain``."""

from __future__ import annotations

from collections.abc import Callable

from . import _validate as v
from ._step import Split, Stage, Step


class Transformer:
    """A ``Step -> Step`` function with a readable name.

    Made by :func:`accumulate`, :func:`clip`, :func:`track_norm`, :func:`tbptt_split` and
    :func:`chain`; apply it to a step with a call: ``clip(0.5)(step)``.
    """

    def __init__(self, name: str, fn: Callable[[Step], Step]) -> None:
        self.name = name
        self._fn = fn

    def __call__(self, step: Step) -> Step:
        if not isinstance(step, Step):
            v.fail(
                self.name,
                "step",
                "must be a looplib Step (from ll.train_step or another transformer)",
                step,
                exc=TypeError,
            )
        return self._fn(step)

    def __repr__(self) -> str:
        return self.name


def stage_transformer(stage: Stage) -> Transformer:
    """A transformer that puts ``stage`` in front of a step's gradient stages."""

    def wrap(step: Step) -> Step:
        if step.split is not None:
            v.fail(
                stage.name,
                "step",
                f"must not already be split into chunks by {step.split.name}: a gradient "
                "transformer outside a batch splitter has no single meaning",
                step,
                fix=f"Put {step.split.name} first: chain({step.split.name}, {stage.name}, ...).",
            )
        if stage.slot is not None and any(s.slot == stage.slot for s in step.stages):
            v.fail(
                stage.name,
                "step",
                f"must not already contain a transformer owning the slot {stage.slot!r}",
                step,
                fix="Use each stateful transformer at most once per chain.",
            )
        return step.replace(stages=(stage, *step.stages))

    return Transformer(stage.name, wrap)


def split_transformer(split: Split) -> Transformer:
    """A transformer that makes a step run each batch as a sequence of chunks."""

    def wrap(step: Step) -> Step:
        if step.split is not None:
            v.fail(
                split.name,
                "step",
                f"must not already be split by {step.split.name}",
                step,
                fix="Use one batch splitter per chain.",
            )
        return step.replace(split=split)

    return Transformer(split.name, wrap)


def chain(*transformers: Transformer) -> Transformer:
    """Compose transformers in the order data flows.

    ``chain(t1, ..., tn)(step)`` is ``t1(t2(...tn(step)))``: the batch enters ``t1`` first and
    the gradient leaves ``tn`` last, just before the optimizer. So
    ``chain(tbptt_split(k), accumulate(K), track_norm(2), clip(c))`` splits each batch into
    time chunks, accumulates K chunks, records the accumulated gradient's norm, clips it, and
    applies it. The rules that give every accepted order one meaning:

    * gradient transformers act in chain order: ``chain(accumulate(K), clip(c))`` clips the
      accumulated gradient once per update, ``chain(clip(c), accumulate(K))`` clips each
      micro-batch's gradient before it is accumulated;
    * a batch splitter (``tbptt_split``) must come before every gradient transformer, and a
      chain has at most one; other orders raise when the chain is applied.

    Example:
        >>> import looplib as ll
        >>> ll.chain(ll.accumulate(4), ll.track_norm(2), ll.clip(0.5))
        chain(accumulate(4), track_norm(2.0), clip(0.5))
    """
    for i, t in enumerate(transformers):
        if not isinstance(t, Transformer):
            v.fail(
                "chain",
                f"transformers[{i}]",
                "must be a looplib transformer such as ll.clip(1.0)",
                t,
                exc=TypeError,
            )
    name = f"chain({', '.join(t.name for t in transformers)})"

    def wrap(step: Step) -> Step:
        for t in reversed(transformers):
            step = t(step)
        return step

    return Transformer(name, wrap)
