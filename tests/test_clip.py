"""``clip`` and ``clip_by_global_norm``: ``torch.nn.utils.clip_grad_norm_`` as the oracle, bit for
bit; ``clip(inf)`` is the identity; clipping is idempotent; the order in a chain decides what
is clipped."""

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
    assert_params_close,
    assert_pure,
    assert_trees_close,
    assert_trees_equal,
    mlp,
    mse,
    regression_batch,
    regression_batches,
    snapshot,
)

NORM_TYPES = [2.0, 1.0, math.inf, 3.5]
SHAPES = {"layer.weight": (3, 4), "layer.bias": (4,), "scale": ()}


def random_grads(seed: int, scale: float = 1.0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}


def torch_clip(grads: dict[str, torch.Tensor], max_norm: float, p: float):
    """``clip_grad_norm_`` on parameters whose ``.grad`` are copies of ``grads``."""
    params = [torch.zeros_like(g, requires_grad=True) for g in grads.values()]
    for param, g in zip(params, grads.values(), strict=True):
        param.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=p)
    return dict(zip(grads, (param.grad for param in params), strict=True)), total


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("p", NORM_TYPES)
@given(
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 0.1, 1.0, 30.0]),
    max_norm=st.sampled_from([1e-2, 0.5, 1.0, 4.0, 1e6]),
)
def test_clip_by_global_norm_equals_clip_grad_norm_bit_for_bit(
    p: float, seed: int, scale: float, max_norm: float
) -> None:
    grads = random_grads(seed, scale)
    snap = snapshot(grads)
    ours, total = ll.clip_by_global_norm(grads, max_norm, p)
    theirs, their_total = torch_clip(grads, max_norm, p)
    assert torch.equal(total, their_total)
    assert torch.equal(total, torch.nn.utils.get_total_norm(list(grads.values()), p))
    for key in grads:
        assert torch.equal(ours[key], theirs[key]), key
    for path, before, _, leaf in snap:
        assert torch.equal(leaf, before), f"{path} was changed"


@pytest.mark.parametrize("p", NORM_TYPES)
def test_clip_in_a_step_matches_clip_grad_norm_(p: float) -> None:
    model = mlp(seed=3, dtype=torch.float32)
    ref = copy.deepcopy(model)
    batches = regression_batches([8] * 10, seed=4, dtype=torch.float32)
    opt = ll.optim.sgd(0.2, momentum=0.9)
    state = ll.fold(ll.clip(0.25, p)(ll.train_step(model, mse, opt)), ll.init(model, opt), batches)

    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    clipped = 0
    for batch in batches:
        torch_opt.zero_grad()
        mse(ref, batch).backward()
        clipped += int(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.25, norm_type=p) > 0.25)
        torch_opt.step()
    assert clipped > 0
    assert_params_close(state, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- laws


@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    p=st.sampled_from(NORM_TYPES),
)
def test_clip_inf_is_the_identity(sizes: list[int], seed: int, p: float) -> None:
    model = mlp(seed=seed % 3, dropout=0.2)
    opt = ll.optim.adam(0.1)
    base = ll.train_step(model, mse, opt)
    batches = regression_batches(sizes, seed=seed)
    # Dropout draws from the state's key: both runs start from the same one.
    want = ll.fold(base, ll.init(model, opt, seed=seed), batches)
    got = ll.fold(ll.clip(math.inf, p)(base), ll.init(model, opt, seed=seed), batches)
    assert_trees_equal(got, want)


def test_clip_inf_keeps_an_infinite_gradient_infinite() -> None:
    """Clipping with ``max_norm=inf`` "to log the norm" must not turn ``inf`` into NaN."""
    model = torch.nn.Linear(1, 1).double()
    opt = ll.optim.sgd(1.0)

    def loss_fn(m, batch):
        return (m.weight * batch).sum()

    batch = torch.tensor([[math.inf]], dtype=torch.float64)
    base = ll.train_step(model, loss_fn, opt)
    got = ll.clip(math.inf)(base)(ll.init(model, opt, seed=0), batch)
    want = base(ll.init(model, opt, seed=0), batch)
    assert_trees_equal(got, want)
    assert torch.isinf(got.params["weight"]).all()


@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
    max_norm=st.floats(1e-2, 1e2),
    p=st.sampled_from(NORM_TYPES),
)
def test_clip_is_idempotent(seed: int, scale: float, max_norm: float, p: float) -> None:
    """Up to the ``1e-6`` added to the norm: a second clip scales by ``max_norm / (max_norm +
    1e-6)`` at most, a relative change of about ``1e-6 / max_norm``."""
    grads = random_grads(seed, scale, dtype=torch.float64)
    once, n1 = ll.clip_by_global_norm(grads, max_norm, p)
    twice, n2 = ll.clip_by_global_norm(once, max_norm, p)
    assert float(n2) <= max_norm * (1 + 1e-12)
    assert float(n2) <= float(n1)
    assert_trees_close(twice, once, rtol=2e-6 / max_norm, atol=0)


@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    max_norm=st.sampled_from([0.01, 0.1, 1.0]),
)
def test_clip_twice_in_a_chain_is_clip_once(sizes: list[int], seed: int, max_norm: float) -> None:
    model = mlp(seed=seed % 3)
    opt = ll.optim.sgd(0.5)
    base = ll.train_step(model, mse, opt)
    batches = regression_batches(sizes, seed=seed)
    once = ll.fold(ll.clip(max_norm)(base), ll.init(model, opt), batches)
    twice = ll.fold(
        ll.chain(ll.clip(max_norm), ll.clip(max_norm))(base), ll.init(model, opt), batches
    )
    # The second clip moves the gradient by at most 1e-6 in norm, so each SGD update by lr * 1e-6.
    assert_trees_close(twice.params, once.params, rtol=0, atol=len(sizes) * 0.5 * 1.01e-6)


def test_clip_is_pure() -> None:
    model = mlp(batchnorm=True)
    opt = ll.optim.sgd(0.1, momentum=0.9)
    step = ll.clip(1e-3)(ll.train_step(model, mse, opt))
    state = ll.init(model, opt)
    for batch in regression_batches([4, 4, 4]):
        state = assert_pure(step, state, batch)


# --------------------------------------------------------------------------- order


def test_clip_before_accumulate_clips_each_micro_batch() -> None:
    """``chain(clip(c), accumulate(K))``: every micro-batch's gradient is clipped on its own,
    then the clipped gradients are averaged by size; the imperative reference does exactly
    that with separate backward passes."""
    k, max_norm = 3, 0.4
    model = mlp(seed=8)
    ref = copy.deepcopy(model)
    micro = regression_batches([2, 5, 3, 4, 1, 6], seed=9)
    opt = ll.optim.sgd(0.3, momentum=0.5)
    step = ll.chain(ll.clip(max_norm), ll.accumulate(k))(ll.train_step(model, mse, opt))
    state = ll.fold(step, ll.init(model, opt), micro)

    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.5)
    params = list(ref.parameters())
    for start in range(0, len(micro), k):
        window = micro[start : start + k]
        total = sum(len(x) for x, _ in window)
        summed = [torch.zeros_like(q) for q in params]
        for batch in window:
            torch_opt.zero_grad()
            mse(ref, batch).backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            for acc, q in zip(summed, params, strict=True):
                acc += q.grad * (len(batch[0]) / total)
        for acc, q in zip(summed, params, strict=True):
            q.grad = acc
        torch_opt.step()
    assert_params_close(state, ref)

    after = ll.fold(
        ll.chain(ll.accumulate(k), ll.clip(max_norm))(ll.train_step(model, mse, opt)),
        ll.init(model, opt),
        micro,
    )
    assert not torch.allclose(after.params["0.weight"], state.params["0.weight"])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "exc", "message"),
    [
        (
            (0,),
            ValueError,
            "clip(max_norm=0): max_norm must be a positive real number or inf, got 0.",
        ),
        (
            (-1.0,),
            ValueError,
            "clip(max_norm=-1.0): max_norm must be a positive real number or inf, got -1.0.",
        ),
        (
            (math.nan,),
            ValueError,
            "clip(max_norm=nan): max_norm must be a positive real number or inf, got nan.",
        ),
        (
            ("1.0",),
            TypeError,
            "clip(max_norm='1.0'): max_norm must be a positive real number or inf, got '1.0'.",
        ),
        (
            (True,),
            TypeError,
            "clip(max_norm=True): max_norm must be a positive real number or inf, got True.",
        ),
        (
            (None,),
            TypeError,
            "clip(max_norm=None): max_norm must be a positive real number or inf, got None.",
        ),
        (
            (1.0, 0),
            ValueError,
            "clip(norm_type=0): norm_type must be a positive real number, inf or 'inf', got 0.",
        ),
        (
            (1.0, -math.inf),
            ValueError,
            "clip(norm_type=-inf): norm_type must be a positive real number, inf or 'inf', "
            "got -inf.",
        ),
        (
            (1.0, "l2"),
            TypeError,
            "clip(norm_type='l2'): norm_type must be a positive real number, inf or 'inf', "
            "got 'l2'.",
        ),
        (
            (1.0, None),
            TypeError,
            "clip(norm_type=None): norm_type must be a positive real number, inf or 'inf', "
            "got None.",
        ),
    ],
)
def test_clip_rejects_bad_arguments(args, exc, message: str) -> None:
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        ll.clip(*args)


def test_clip_accepts_inf_spelled_as_a_string() -> None:
    assert repr(ll.clip(1.0, "inf")) == "clip(1.0, norm_type=inf)"
    assert repr(ll.clip(1.0, "INF")) == "clip(1.0, norm_type=inf)"
    assert repr(ll.clip(2)) == "clip(2.0)"
    assert repr(ll.clip(math.inf)) == "clip(inf)"


def test_clip_by_global_norm_of_no_gradients() -> None:
    clipped, total = ll.clip_by_global_norm({}, 1.0)
    assert clipped == {} and float(total) == 0.0
    assert clip_shape_kept(regression_batch(3)[0])


def clip_shape_kept(x: torch.Tensor) -> bool:
    out, _ = ll.clip_by_global_norm({"x": x}, 1e-3)
    return out["x"].shape == x.shape and out["x"].dtype == x.dtype
