"""``fold`` and ``scan``: ``functools.reduce`` is the oracle."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import looplib as ll
from tests.helpers import assert_trees_equal, mlp, mse, regression_batches

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
    torch.manual_seed(seed)  # the same dropout masks for both runs
    got = ll.fold(step, state, batches)
    torch.manual_seed(seed)
    want = functools.reduce(step, batches, state)
    assert_trees_equal(got, want)


@given(sizes=st.lists(st.integers(2, 5), max_size=6), seed=st.integers(0, 2**16))
def test_scan_returns_the_fold_and_each_steps_metrics(sizes: list[int], seed: int) -> None:
    model = mlp(seed=seed % 3)
    opt = ll.optim.sgd(0.1)
    step = ll.track_norm(2)(ll.train_step(model, mse, opt))
    batches = regression_batches(sizes, seed=seed)
    state, metrics = ll.scan(step, ll.init(model, opt), batches)
    assert_trees_equal(state, ll.fold(step, ll.init(model, opt), batches))
    assert len(metrics) == len(sizes)
    manual = ll.init(model, opt)
    for batch, m in zip(batches, metrics, strict=True):
        manual = step(manual, batch)
        assert_trees_equal(m, manual.metrics)


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
    got = ll.fold(step, ll.init(model, opt), (b for b in batches))
    assert int(got.step) == 3
    assert_trees_equal(got, ll.fold(step, ll.init(model, opt), batches))


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
    with pytest.raises(TypeError, match=r"^step\(state=None\): state must be a looplib TrainState"):
        func(ll.train_step(model, mse, opt), None, regression_batches([2]))
