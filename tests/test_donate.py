"""ll.donate: the same results as the pure step, written into the input state's tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import looplib as ll

OPTIMIZERS = {
    "sgd": lambda: ll.optim.sgd(0.1),
    "momentum": lambda: ll.optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda: ll.optim.adam(1e-2, weight_decay=1e-3),
    "adamw": lambda: ll.optim.adamw(1e-2),
}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))


def ce(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(m(x), y)


def data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(sorted(OPTIMIZERS)),
    k=st.integers(1, 3),
    clip=st.sampled_from([None, 0.5]),
    n=st.integers(1, 7),
)
def test_donating_equals_the_pure_step_bit_for_bit(
    name: str, k: int, clip: float | None, n: int
) -> None:
    m, opt = model(), OPTIMIZERS[name]()
    stages = [ll.accumulate(k), ll.track_norm(2)] + ([ll.clip(clip)] if clip else [])
    pure = ll.chain(*stages)(ll.train_step(m, ce, opt))
    start = ll.init(m, opt)  # one key for every run
    pure_state = ll.fold(pure, start, data(n))
    donated = ll.donate(pure)
    donated_state = ll.fold(donated, start, data(n))
    # The donating step called batch by batch (the window closed by a select), on a copy.
    state = _copy(start)
    for batch in data(n):
        state = donated(state, batch)
    for other in (donated_state, state):
        for a, b in zip(
            torch.utils._pytree.tree_leaves(pure_state),
            torch.utils._pytree.tree_leaves(other),
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _copy(state: ll.TrainState) -> ll.TrainState:
    return torch.utils._pytree.tree_map(
        lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state
    )


@pytest.mark.parametrize("k", [1, 3])
def test_fold_never_writes_into_the_callers_state(k: int) -> None:
    """fold donates only the states it made itself, even for a donating step."""
    m, opt = model(), ll.optim.adam(1e-2)
    step = ll.donate(ll.chain(ll.accumulate(k), ll.clip(0.5))(ll.train_step(m, ce, opt)))
    start = ll.init(m, opt)
    leaves = torch.utils._pytree.tree_leaves(start)
    versions = [x._version for x in leaves]
    values = [x.clone() for x in leaves]
    out = ll.fold(step, start, data(5))
    assert int(out.step) == 5 // k
    assert [x._version for x in leaves] == versions
    assert all(torch.equal(x, v) for x, v in zip(leaves, values, strict=True))


def test_the_update_lands_in_the_input_tensors() -> None:
    m, opt = model(), ll.optim.adam(1e-2)
    step = ll.donate(ll.train_step(m, ce, opt))
    state = ll.init(m, opt)
    before = {k: v.data_ptr() for k, v in state.params.items()}
    moments = [v.data_ptr() for v in state.opt_state.mu.values()]
    after = step(state, data(1)[0])
    assert {k: v.data_ptr() for k, v in after.params.items()} == before
    assert [v.data_ptr() for v in after.opt_state.mu.values()] == moments
    assert int(after.step) == 1


def test_donate_checks_its_argument() -> None:
    with pytest.raises(TypeError, match=r"^donate\(step=.*\): step must be a looplib Step"):
        ll.donate(lambda s, b: s)
