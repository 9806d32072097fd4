"""Run a module on tensors other than its own, quickly: the eager path of the pure step.

``torch.func.functional_call`` walks the module tree, unties weights and checks names on every
call (about 60 µs on a three-layer MLP). The step calls the same module with the same names
every time, so :class:`Swapper` works out once, when the step is built, where each tensor lives
(every module and attribute that holds it, tied weights included), and on each call only writes
the new tensors into those slots and puts the originals back afterwards: the same dictionary
assignments ``functional_call`` ends up making.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

Place = tuple[dict[str, Any], str]
"""A module's ``_parameters`` or ``_buffers`` dict and the key that holds a tensor there."""


def _places(
    model: nn.Module, table: str, tensors: Iterator[tuple[str, Tensor]]
) -> list[list[Place]]:
    """For each tensor (in ``named_parameters()``/``named_buffers()`` order), every slot that
    holds it: a tied weight appears in several modules."""
    order = [t for _, t in tensors]
    where: dict[int, list[Place]] = {id(t): [] for t in order}
    seen: set[tuple[int, str]] = set()
    for module in model.modules():
        slots: dict[str, Any] = getattr(module, table)
        for key, value in slots.items():
            if value is not None and id(value) in where and (id(slots), key) not in seen:
                seen.add((id(slots), key))
                where[id(value)].append((slots, key))
    return [where[id(t)] for t in order]


class Swapper:
    """Calls ``fn`` with ``model``'s parameters and buffers replaced by given tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.params = _places(model, "_parameters", model.named_parameters())
        self.buffers = _places(model, "_buffers", model.named_buffers())

    def call(
        self, params: list[Tensor], buffers: list[Tensor], fn: Callable[[], Any]
    ) -> tuple[Any, list[Tensor]]:
        """Run ``fn()`` with the swap in place; return its result and the buffers as the module
        left them (a module may assign a new buffer tensor instead of writing in place)."""
        saved: list[tuple[dict[str, Any], str, Any]] = []
        try:
            for places, tensor in zip(self.params, params, strict=True):
                for slots, key in places:
                    saved.append((slots, key, slots[key]))
                    slots[key] = tensor
            for places, tensor in zip(self.buffers, buffers, strict=True):
                for slots, key in places:
                    saved.append((slots, key, slots[key]))
                    slots[key] = tensor
            result = fn()
            after = [
                places[0][0][places[0][1]] if places else t
                for places, t in zip(self.buffers, buffers, strict=True)
            ]
        finally:
            for slots, key, original in reversed(saved):
                slots[key] = original
        return result, after
