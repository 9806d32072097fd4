"""``track_norm``: per-parameter ``g.norm(p)`` and ``torch.nn.utils.get_total_norm`` as oracles,
the classic key format, and where in a chain the norm is read."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import looplib as ll
from tests.helpers import (
    assert_pure,
    assert_trees_equal,
    mlp,
    mse,
    regression_batch,
    regression_batches,
)

NORM_TYPES = [2.0, 1.0, math.inf, 3.5]
NAMES = ["0.bias", "0.weight", "2.bias", "2.weight"]


def imperative_grads(model, batch) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(model)
    mse(ref, batch).backward()
    return {name: p.grad for name, p in ref.named_parameters()}


@pytest.mark.parametrize("p", NORM_TYPES)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 9))
def test_track_norm_matches_per_parameter_norms_and_get_total_norm(
    p: float, seed: int, n: int
) -> None:
    model = mlp(seed=seed % 4)
    batch = regression_batch(n, seed=seed)
    opt = ll.optim.sgd(0.1)
    state = ll.track_norm(p)(ll.train_step(model, mse, opt))(ll.init(model, opt), batch)
    grads = imperative_grads(model, batch)
    tag = "inf" if math.isinf(p) else str(p)
    for name, g in grads.items():
        torch.testing.assert_close(
            state.metrics[f"grad_{tag}_norm/{name}"], g.norm(p), rtol=1e-12, atol=0
        )
    total = torch.nn.utils.get_total_norm(list(grads.values()), p)
    torch.testing.assert_close(state.metrics[f"grad_{tag}_norm_total"], total, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("p", "tag"),
    [(2, "2.0"), (2.0, "2.0"), (1, "1.0"), (3.5, "3.5"), (math.inf, "inf"), ("inf", "inf")],
)
def test_metric_keys(p, tag: str) -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)
    state = ll.track_norm(p)(ll.train_step(model, mse, opt))(
        ll.init(model, opt), regression_batch(3)
    )
    norm_keys = [f"grad_{tag}_norm/{name}" for name in NAMES] + [f"grad_{tag}_norm_total"]
    assert sorted(state.metrics) == sorted([*norm_keys, "loss", "lr", "weight"])
    for key in norm_keys:
        value = state.metrics[key]
        assert isinstance(value, torch.Tensor) and value.shape == () and not value.requires_grad


def test_per_param_false_records_only_the_total() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)
    step = ll.track_norm(2, per_param=False)(ll.train_step(model, mse, opt))
    state = step(ll.init(model, opt), regression_batch(3))
    assert sorted(state.metrics) == ["grad_2.0_norm_total", "loss", "lr", "weight"]


@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_track_norm_does_not_change_the_update(sizes: list[int], seed: int) -> None:
    model = mlp(seed=seed % 3)
    opt = ll.optim.adam(0.1)
    base = ll.train_step(model, mse, opt)
    batches = regression_batches(sizes, seed=seed)
    want = ll.fold(base, ll.init(model, opt, seed=seed), batches)
    got = ll.fold(ll.track_norm("inf")(base), ll.init(model, opt, seed=seed), batches)
    norms = {k: m for k, m in got.metrics.items() if k.startswith("grad_")}
    assert sorted(norms) == [*sorted(f"grad_inf_norm/{n}" for n in NAMES), "grad_inf_norm_total"]
    assert_trees_equal(got._replace(metrics={}), want._replace(metrics={}))
    assert_trees_equal({k: m for k, m in got.metrics.items() if k not in norms}, want.metrics)


def test_before_clip_it_sees_the_unclipped_gradient_after_clip_the_clipped_one() -> None:
    model = mlp(seed=1)
    batch = regression_batch(6, seed=2)
    opt = ll.optim.sgd(0.1)
    base = ll.train_step(model, mse, opt)
    total = torch.nn.utils.get_total_norm(list(imperative_grads(model, batch).values()))
    max_norm = float(total) / 4
    before = ll.chain(ll.track_norm(2), ll.clip(max_norm))(base)(ll.init(model, opt), batch)
    after = ll.chain(ll.clip(max_norm), ll.track_norm(2))(base)(ll.init(model, opt), batch)
    torch.testing.assert_close(before.metrics["grad_2.0_norm_total"], total)
    clipped = total * (max_norm / (total + 1e-6))  # clip_grad_norm_'s coefficient
    torch.testing.assert_close(after.metrics["grad_2.0_norm_total"], clipped)
    assert_trees_equal(before.params, after.params)


def test_two_norms_in_one_chain() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)
    step = ll.chain(ll.track_norm(2), ll.track_norm("inf", per_param=False))(
        ll.train_step(model, mse, opt)
    )
    state = step(ll.init(model, opt), regression_batch(4))
    assert "grad_2.0_norm_total" in state.metrics and "grad_inf_norm_total" in state.metrics
    assert "grad_inf_norm/0.weight" not in state.metrics


def test_after_accumulate_the_norm_is_nan_until_the_first_update_then_held() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)
    step = ll.chain(ll.accumulate(3), ll.track_norm(2))(ll.train_step(model, mse, opt))
    micro = regression_batches([2, 3, 4, 2, 3], seed=5)
    start = ll.init(model, opt)
    window = tuple(torch.cat(t) for t in zip(*micro[:3], strict=True))
    want = torch.nn.utils.get_total_norm(list(imperative_grads(model, window).values()))

    # Call by call: the keys exist from the first call (NaN), the value appears when the first
    # window closes and is held while the next one is open.
    states = [step.init(start, micro[0])]
    for batch in micro:
        states.append(step(states[-1], batch))
    totals = [s.metrics["grad_2.0_norm_total"] for s in states]
    keys = [sorted(s.metrics) for s in states]
    assert all(k == keys[0] for k in keys), "the metric keys are fixed before the first call"
    assert all(torch.isnan(t) for t in totals[:3])
    assert not torch.isnan(totals[3])
    assert torch.equal(totals[4], totals[3]) and torch.equal(totals[5], totals[3])
    torch.testing.assert_close(totals[3], want)
    assert totals[0].dtype == totals[3].dtype == torch.float64

    # scan feeds whole windows: one entry per call, the closed window and the open one.
    _, metrics = ll.scan(step, start, micro)
    assert len(metrics) == 2
    assert [sorted(m) for m in metrics] == [keys[0], keys[0]]
    assert torch.equal(metrics[0]["grad_2.0_norm_total"], totals[3])
    assert torch.equal(metrics[1]["grad_2.0_norm_total"], totals[3])


def test_track_norm_is_pure() -> None:
    model = mlp(batchnorm=True, dropout=0.2)
    opt = ll.optim.sgd(0.1)
    step = ll.chain(ll.accumulate(2), ll.track_norm(2))(ll.train_step(model, mse, opt))
    state = ll.init(model, opt)
    for batch in regression_batches([3, 3, 3]):
        state = assert_pure(step, state, batch)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        (
            {"norm_type": 0},
            ValueError,
            "track_norm(norm_type=0): norm_type must be a positive real number, inf or 'inf', "
            "got 0.",
        ),
        (
            {"norm_type": -2.0},
            ValueError,
            "track_norm(norm_type=-2.0): norm_type must be a positive real number, inf or "
            "'inf', got -2.0.",
        ),
        (
            {"norm_type": math.nan},
            ValueError,
            "track_norm(norm_type=nan): norm_type must be a positive real number, inf or "
            "'inf', got nan.",
        ),
        (
            {"norm_type": "fro"},
            TypeError,
            "track_norm(norm_type='fro'): norm_type must be a positive real number, inf or "
            "'inf', got 'fro'.",
        ),
        (
            {"norm_type": False},
            TypeError,
            "track_norm(norm_type=False): norm_type must be a positive real number, inf or "
            "'inf', got False.",
        ),
        (
            {"per_param": 1},
            TypeError,
            "track_norm(per_param=1): per_param must be a bool, got 1.",
        ),
    ],
)
def test_track_norm_rejects_bad_arguments(kwargs, exc, message: str) -> None:
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        ll.track_norm(**kwargs)


def test_repr() -> None:
    assert repr(ll.track_norm()) == "track_norm(2.0)"
    assert repr(ll.track_norm("inf")) == "track_norm(inf)"
    assert repr(ll.track_norm(1, per_param=False)) == "track_norm(1.0, per_param=False)"
