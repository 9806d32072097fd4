"""``fold`` and ``scan``: ``functools.reduce`` is the oracle.

For a looplib step ``fold`` hands the step whole accumulation windows and lets it write into the
states it made itself; the result is still the reduce's, bit for bit, and the caller's state is
never written. ``scan`` records ``state.metrics`` once per call of the step's run: per window
under ``accumulate``, per batch otherwise. A plain function is folded exactly as by ``reduce``.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import looplib as ll
from tests.helpers import (
    assert_snapshot_unchanged,
    assert_trees_equal,
    mlp,
    mse,
    regression_batches,
    snapshot,
)

TRANSFORMERS = {
    "plain": lambda: ll.chain(),
    "accumulate": lambda: ll.accumulate(3),
    "clip": lambda: ll.clip(0.05),
    "all": lambda: ll.chain(ll.accumulate(2), ll.track_norm(2), ll.clip(0.1)),
}


@given(
    sizes=st.lists(st.integers(2, 5), max_size=7),
    which=st.sampled_from(sorted(TRANSFORMERS)),
    seed=st.integers(0, 2**16),
)
def test_fold_is_functools_reduce(sizes: list[int], which: str, seed: int) -> None:
    model = mlp(seed=seed % 3, batchnorm=True, dropout=0.2)
    opt = ll.optim.adam(0.05)
    step = TRANSFORMERS[which]()(ll.train_step(model, mse, opt))
    batches = regression_batches(sizes, seed=seed)
    state = ll.init(model, opt)
    snap = snapshot(state)
    # Dropout draws from the state's key, never from the global generator.
    global_rng = torch.random.get_rng_state()
    got = ll.fold(step, state, batches)
    assert torch.equal(torch.random.get_rng_state(), global_rng)
    assert_snapshot_unchanged(snap)  # fold donates only the states it made itself
    torch.manual_seed(seed + 1)  # makes no difference
    want = functools.reduce(step, batches, state)
    assert_trees_equal(got, want)


@given(sizes=st.lists(st.integers(2, 5), max_size=6), seed=st.integers(0, 2**16))
def test_scan_returns_the_fold_and_each_steps_metrics(sizes: list[int], seed: int) -> None:
    model = mlp(seed=seed % 3)
    opt = ll.optim.sgd(0.1)
    step = ll.track_norm(2)(ll.train_step(model, mse, opt))
    batches = regression_batches(sizes, seed=seed)
    start = ll.init(model, opt)
    state, metrics = ll.scan(step, start, batches)
    assert_trees_equal(state, ll.fold(step, start, batches))
    assert len(metrics) == len(sizes)
    manual = start
    for batch, m in zip(batches, metrics, strict=True):
        manual = step(manual, batch)
        assert_trees_equal(m, manual.metrics)


@given(
    sizes=st.lists(st.integers(2, 5), max_size=9),
    k=st.integers(2, 4),
    seed=st.integers(0, 2**16),
)
def test_scan_records_one_entry_per_accumulation_window(sizes: list[int], k: int, seed: int):
    """Under ``accumulate(k)`` scan runs whole windows: one entry per window (the last one
    possibly open), each the metrics of the per-call loop at that window's last batch."""
    model = mlp(seed=seed % 3, dropout=0.2)
    opt = ll.optim.sgd(0.1)
    step = ll.chain(ll.accumulate(k), ll.track_norm(2))(ll.train_step(model, mse, opt))
    batches = regression_batches(sizes, seed=seed)
    start = ll.init(model, opt)
    state, metrics = ll.scan(step, start, batches)
    assert_trees_equal(state, ll.fold(step, start, batches))
    ends = [min(i + k, len(sizes)) for i in range(0, len(sizes), k)]
    assert len(metrics) == len(ends)
    manual, states = start, []
    for batch in batches:
        manual = step(manual, batch)
        states.append(manual)
    assert_trees_equal(manual, state)
    for end, m in zip(ends, metrics, strict=True):
        assert_trees_equal(m, states[end - 1].metrics)


def test_scan_entries_are_copies() -> None:
    """fold writes into the states it made; the recorded metrics must not follow."""
    model = mlp()
    opt = ll.optim.sgd(0.1)
    step = ll.donate(ll.train_step(model, mse, opt))
    _, metrics = ll.scan(step, ll.init(model, opt), regression_batches([2, 3, 4]))
    losses = [m["loss"] for m in metrics]
    assert len({float(x) for x in losses}) == 3
    assert len({id(x) for x in losses}) == 3


def test_fold_and_scan_of_a_plain_function_are_reduce() -> None:
    """No init, no windows, no checks: one call per batch, in order, as functools.reduce."""
    calls = []

    def add(total: int, x: int) -> int:
        calls.append((total, x))
        return total + x

    assert ll.fold(add, 0, [1, 2, 3, 4]) == functools.reduce(add, [1, 2, 3, 4], 0) == 10
    assert calls[:4] == [(0, 1), (1, 2), (3, 3), (6, 4)] == calls[4:]
    assert ll.fold(add, 5, []) == 5

    class Metricky(tuple):
        @property
        def metrics(self) -> dict[str, int]:
            return {"sum": self[0]}

    def step(state: Metricky, x: int) -> Metricky:
        return Metricky((state[0] + x,))

    final, entries = ll.scan(step, Metricky((0,)), iter([1, 2, 3]))
    assert final == (6,)
    assert entries == [{"sum": 1}, {"sum": 3}, {"sum": 6}]


def test_fold_over_nothing_returns_the_state() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)
    state = ll.init(model, opt)
    step = ll.train_step(model, mse, opt)
    assert ll.fold(step, state, []) is state
    assert ll.scan(step, state, iter(())) == (state, [])


def test_fold_consumes_a_one_shot_iterator() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)
    step = ll.train_step(model, mse, opt)
    batches = regression_batches([2, 3, 4])
    start = ll.init(model, opt)
    got = ll.fold(step, start, (b for b in batches))
    assert int(got.step) == 3
    assert_trees_equal(got, ll.fold(step, start, batches))


def test_fold_leaves_an_accumulation_window_open() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)
    step = ll.accumulate(4)(ll.train_step(model, mse, opt))
    state = ll.fold(step, ll.init(model, opt), regression_batches([2] * 6))
    assert int(state.step) == 1 and int(state.slots["accumulate"].count) == 2
    assert int(step.flush(state).step) == 2


@pytest.mark.parametrize("func", [ll.fold, ll.scan])
def test_fold_and_scan_reject_bad_arguments(func) -> None:
    name = func.__name__
    model = mlp()
    opt = ll.optim.sgd(0.1)
    state = ll.init(model, opt)
    with pytest.raises(
        TypeError,
        match="^"
        + re.escape(f"{name}(step=3): step must be a step (state, batch) -> state, got 3.")
        + "$",
    ):
        func(3, state, [])
    with pytest.raises(
        TypeError,
        match="^"
        + re.escape(
            f"{name}(batches=5): batches must be an iterable of batches (a list, a DataLoader), "
            "got 5."
        )
        + "$",
    ):
        func(ll.train_step(model, mse, opt), state, 5)
    with pytest.raises(
        TypeError,
        match="^"
        # Named after the function called, as fold's structure errors are.
        + re.escape(
            f"{name}(state=None): state must be a looplib TrainState (from ll.init), got None."
        )
        + "$",
    ):
        func(ll.train_step(model, mse, opt), None, regression_batches([2]))
