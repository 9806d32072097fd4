"""``clip_value``: ``torch.nn.utils.clip_grad_value_`` as the oracle, bit for bit;
``clip_value(inf)`` is the identity; clamping is idempotent and pure; the order in a chain
decides whether each micro-batch's gradient or the window's is clamped."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import looplib as ll
from looplib._clip_value import _clamp
from tests.helpers import (
    assert_params_close,
    assert_pure,
    assert_trees_equal,
    mlp,
    mse,
    regression_batches,
    snapshot,
)

SHAPES = {"layer.weight": (3, 4), "layer.bias": (4,), "scale": ()}


def random_grads(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def torch_clip_value(grads: dict[str, torch.Tensor], c: float) -> dict[str, torch.Tensor]:
    params = [torch.zeros_like(g, requires_grad=True) for g in grads.values()]
    for param, g in zip(params, grads.values(), strict=True):
        param.grad = g.clone()
    torch.nn.utils.clip_grad_value_(params, c)
    return dict(zip(grads, (param.grad for param in params), strict=True))


# --------------------------------------------------------------------------- oracle


@given(
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 0.1, 1.0, 30.0]),
    c=st.sampled_from([1e-3, 0.1, 0.5, 2.0, 1e6]),
    special=st.booleans(),
)
def test_clamp_equals_clip_grad_value_bit_for_bit(
    seed: int, scale: float, c: float, special: bool
) -> None:
    grads = random_grads(seed, scale)
    if special:
        grads["layer.weight"][0, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    snap = snapshot(grads)
    ours, theirs = _clamp(grads, c), torch_clip_value(grads, c)
    assert_trees_equal(ours, theirs)
    for path, before, _, leaf in snap:
        assert torch.equal(leaf.nan_to_num(), before.nan_to_num()), f"{path} was changed"


def test_clip_value_in_a_step_matches_clip_grad_value_() -> None:
    model = mlp(seed=3, dtype=torch.float32)
    ref = copy.deepcopy(model)
    batches = regression_batches([8] * 10, seed=4, dtype=torch.float32)
    opt = ll.optim.sgd(0.2, momentum=0.9)
    step = ll.clip_value(0.05)(ll.train_step(model, mse, opt))
    state = ll.fold(step, ll.init(model, opt), batches)

    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    clamped = 0
    for batch in batches:
        torch_opt.zero_grad()
        mse(ref, batch).backward()
        clamped += sum(int((p.grad.abs() > 0.05).sum()) for p in ref.parameters())
        torch.nn.utils.clip_grad_value_(ref.parameters(), 0.05)
        torch_opt.step()
    assert clamped > 0
    assert_params_close(state, ref, rtol=0, atol=0)


# --------------------------------------------------------------------------- laws


@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_clip_value_inf_is_the_identity(sizes: list[int], seed: int) -> None:
    model = mlp(seed=seed % 3, dropout=0.2)
    opt = ll.optim.adam(0.1)
    base = ll.train_step(model, mse, opt)
    batches = regression_batches(sizes, seed=seed)
    want = ll.fold(base, ll.init(model, opt, seed=seed), batches)
    got = ll.fold(ll.clip_value(math.inf)(base), ll.init(model, opt, seed=seed), batches)
    assert_trees_equal(got, want)


@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3), c=st.floats(1e-3, 1e2))
def test_clip_value_is_idempotent(seed: int, scale: float, c: float) -> None:
    once = _clamp(random_grads(seed, scale), c)
    assert all(bool((g.abs() <= c).all()) for g in once.values())
    assert_trees_equal(_clamp(once, c), once)


@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_clip_value_twice_in_a_chain_is_clip_value_once(sizes: list[int], seed: int) -> None:
    model = mlp(seed=seed % 3)
    opt = ll.optim.sgd(0.5)
    base = ll.train_step(model, mse, opt)
    batches = regression_batches(sizes, seed=seed)
    once = ll.fold(ll.clip_value(0.01)(base), ll.init(model, opt, seed=seed), batches)
    twice = ll.fold(
        ll.chain(ll.clip_value(0.01), ll.clip_value(0.01))(base),
        ll.init(model, opt, seed=seed),
        batches,
    )
    assert_trees_equal(twice, once)


def test_clip_value_is_pure() -> None:
    model = mlp(batchnorm=True)
    opt = ll.optim.sgd(0.1, momentum=0.9)
    step = ll.clip_value(1e-3)(ll.train_step(model, mse, opt))
    state = ll.init(model, opt)
    for batch in regression_batches([4, 4, 4]):
        state = assert_pure(step, state, batch)


def test_clip_value_compiled_and_vmapped_equal_eager() -> None:
    model = mlp(seed=5, dtype=torch.float32)
    opt = ll.optim.adam(0.05)
    step = ll.chain(ll.accumulate(2), ll.clip_value(0.02))(ll.train_step(model, mse, opt))
    batches = regression_batches([4] * 6, seed=6, dtype=torch.float32)
    eager = ll.fold(step, ll.init(model, opt, seed=0), batches)
    compiled = ll.fold(ll.compile(step, backend="aot_eager"), ll.init(model, opt, seed=0), batches)
    torch.testing.assert_close(compiled.params, eager.params, rtol=1e-6, atol=1e-7)
    states = [step.init(ll.init(model, opt, seed=s), batches[0]) for s in range(2)]
    members = ll.unstack(ll.fold(ll.vmap(step), ll.stack(states), batches))
    for member in members:
        torch.testing.assert_close(member.params, eager.params, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- order


def test_before_accumulate_clamps_each_micro_batch_after_it_the_window() -> None:
    k, c = 3, 0.02
    model = mlp(seed=8)
    micro = regression_batches([2, 5, 3, 4, 1, 6], seed=9)
    opt = ll.optim.sgd(0.3, momentum=0.5)

    def reference(per_micro: bool) -> torch.nn.Module:
        ref = copy.deepcopy(model)
        torch_opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.5)
        params = list(ref.parameters())
        for start in range(0, len(micro), k):
            window = micro[start : start + k]
            total = sum(len(x) for x, _ in window)
            summed = [torch.zeros_like(q) for q in params]
            for batch in window:
                torch_opt.zero_grad()
                mse(ref, batch).backward()
                if per_micro:
                    torch.nn.utils.clip_grad_value_(params, c)
                for acc, q in zip(summed, params, strict=True):
                    acc += q.grad * (len(batch[0]) / total)
            for acc, q in zip(summed, params, strict=True):
                q.grad = acc
            if not per_micro:
                torch.nn.utils.clip_grad_value_(params, c)
            torch_opt.step()
        return ref

    before = ll.chain(ll.clip_value(c), ll.accumulate(k))(ll.train_step(model, mse, opt))
    after = ll.chain(ll.accumulate(k), ll.clip_value(c))(ll.train_step(model, mse, opt))
    s_before = ll.fold(before, ll.init(model, opt), micro)
    s_after = ll.fold(after, ll.init(model, opt), micro)
    assert_params_close(s_before, reference(per_micro=True))
    assert_params_close(s_after, reference(per_micro=False))
    assert not torch.allclose(s_before.params["0.weight"], s_after.params["0.weight"])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("value", "exc"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        ("1", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_clip_value_rejects_bad_arguments(value: object, exc: type[Exception]) -> None:
    shown = repr(value)
    message = (
        f"clip_value(clip_value={shown}): clip_value must be a positive real number or inf, "
        f"got {shown}."
    )
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        ll.clip_value(value)  # type: ignore[arg-type]


def test_clip_value_repr() -> None:
    assert repr(ll.clip_value(2)) == "clip_value(2.0)"
    assert repr(ll.clip_value(math.inf)) == "clip_value(inf)"
    assert repr(ll.chain(ll.accumulate(2), ll.clip_value(0.5))) == (
        "chain(accumulate(2), clip_value(0.5))"
    )
