"""Random numbers as part of the state: the generator state travels in ``state.slots["rng"]``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

SLOT = "rng"


def rng_slot(seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Fresh generator states for ``seed``: the CPU generator, and the CUDA generator of
    ``device`` when the params live on a GPU."""
    slot = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    if device.type == "cuda":
        with torch.random.fork_rng(devices=[device]):
            torch.cuda.manual_seed(seed)
            slot["cuda"] = torch.cuda.get_rng_state(device)
    return slot


class _Out:
    value: dict[str, torch.Tensor]


@contextmanager
def rng_scope(slot: dict[str, torch.Tensor], device: torch.device) -> Iterator[_Out]:
    """Run a block with torch's global generators set from ``slot``; afterwards ``out.value``
    holds their advanced states and the caller's global generators are as they were."""
    out = _Out()
    devices: list[Any] = [device] if "cuda" in slot else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(slot["cpu"])
        if "cuda" in slot:
            torch.cuda.set_rng_state(slot["cuda"], device)
        yield out
        value = {"cpu": torch.get_rng_state()}
        if "cuda" in slot:
            value["cuda"] = torch.cuda.get_rng_state(device)
        out.value = value
