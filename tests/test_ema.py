"""``ema``: ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` as the oracle,
updated after every applied ``torch.optim`` step of a hand-written loop (accumulation and
skipped non-finite windows included); laws: ``ema(0)`` is the params, ``ema(1)`` the params of
the first update; held and skipped steps leave the average alone; purity, donation, ``compile``,
``vmap`` (every member its own average) and checkpoints; pinned errors."""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import looplib as ll
from looplib._ema import SLOT, EmaState
from tests.helpers import (
    assert_pure,
    assert_trees_equal,
    mlp,
    mse,
    regression_batches,
)

K, DECAY, MAX_NORM = 3, 0.9, 1.0


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def faulty_batches(n: int, bad: set[int], seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    batches = regression_batches([4] * n, seed=seed)
    for i in bad:
        x, y = batches[i]
        x = x.clone()
        x[0, 0] = math.nan
        batches[i] = (x, y)
    return batches


def reference(model: nn.Module, batches: list[Any], decay: float) -> tuple[nn.Module, Any, int]:
    """A hand loop: AdamW, K-micro-batch windows weighted by size, a window with a non-finite
    loss or gradient skipped whole, clip_grad_norm_, AveragedModel updated after each step."""
    ref = copy.deepcopy(model)
    averaged = AveragedModel(ref, multi_avg_fn=get_ema_multi_avg_fn(decay))
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.1)
    params = list(ref.parameters())
    applied = 0
    for start in range(0, len(batches), K):
        window = batches[start : start + K]
        total = sum(len(b[0]) for b in window)
        summed = [torch.zeros_like(p) for p in params]
        loss_sum = 0.0
        for b in window:
            opt.zero_grad()
            loss = loss_fn(ref, b)
            loss.backward()
            loss_sum += float(loss.detach()) * len(b[0])
            for acc, p in zip(summed, params, strict=True):
                acc += p.grad * (len(b[0]) / total)
        finite = math.isfinite(loss_sum) and all(bool(torch.isfinite(g).all()) for g in summed)
        if not finite:
            continue
        for acc, p in zip(summed, params, strict=True):
            p.grad = acc
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()
        averaged.update_parameters(ref)
        applied += 1
    return ref, averaged, applied


def chain_step(model: nn.Module, decay: float = DECAY) -> tuple[ll.Step, ll.Optimizer]:
    opt = ll.optim.adamw(0.05, weight_decay=0.1)
    step = ll.chain(ll.accumulate(K), ll.skip_nonfinite(5), ll.clip(MAX_NORM), ll.ema(decay))(
        ll.train_step(model, loss_fn, opt)
    )
    return step, opt


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_against_averaged_model_in_a_hand_loop(compiled: bool) -> None:
    """54 applied updates of 3 micro-batches each (and 2 windows skipped), float64."""
    model = mlp(seed=1)
    batches = faulty_batches(56 * K, bad={7, 100})
    step, opt = chain_step(model)
    run = ll.compile(step, backend="aot_eager") if compiled else step
    state = ll.fold(run, ll.init(model, opt), batches)
    ref, averaged, applied = reference(model, batches, DECAY)
    assert applied == 54 and int(state.step) == 54
    assert int(state.slots[SLOT].count) == int(averaged.n_averaged) == 54
    tol: dict[str, Any] = (
        {"rtol": 1e-9, "atol": 1e-11} if compiled else {"rtol": 1e-12, "atol": 1e-14}
    )
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), **tol, msg=name)
    ema = ll.ema_params(state)
    for name, p in averaged.module.named_parameters():
        torch.testing.assert_close(ema[name], p.detach(), **tol, msg=name)


def test_the_average_differs_from_the_params_and_evaluates() -> None:
    model = mlp(seed=2)
    batches = regression_batches([4] * 12, seed=3)
    step, opt = chain_step(model)
    state = ll.fold(step, ll.init(model, opt), batches)
    swapped = ll.with_ema_params(state)
    assert_trees_equal(swapped.params, ll.ema_params(state))
    assert_trees_equal(swapped._replace(params=state.params), state)
    assert not torch.equal(swapped.params["0.weight"], state.params["0.weight"])
    _, averaged, _ = reference(model, batches, DECAY)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        want = float(F.mse_loss(averaged(x), y))
    got = ll.evaluate(step, swapped, batches)["loss"]
    assert got == pytest.approx(want, rel=1e-10)
    assert ll.evaluate(step, state, batches)["loss"] != pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------------- laws


@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_ema_zero_is_the_params_and_ema_one_the_first_update(sizes: list[int], seed: int) -> None:
    model = mlp(seed=seed % 3)
    opt = ll.optim.sgd(0.3, momentum=0.5)
    base = ll.train_step(model, mse, opt)
    batches = regression_batches(sizes, seed=seed)
    state = ll.fold(ll.ema(0.0)(base), ll.init(model, opt), batches)
    assert_trees_equal(ll.ema_params(state), state.params)
    first = base(ll.init(model, opt), batches[0])
    state = ll.fold(ll.ema(1.0)(base), ll.init(model, opt), batches)
    assert_trees_equal(ll.ema_params(state), first.params)


@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_ema_leaves_the_training_unchanged(sizes: list[int], seed: int) -> None:
    model = mlp(seed=seed % 3, dropout=0.2)
    opt = ll.optim.adam(0.1)
    base = ll.chain(ll.accumulate(2), ll.clip(0.5))(ll.train_step(model, mse, opt))
    with_ema = ll.chain(ll.accumulate(2), ll.clip(0.5), ll.ema(0.8))(ll.train_step(model, mse, opt))
    batches = regression_batches(sizes, seed=seed)
    want = ll.fold(base, ll.init(model, opt, seed=seed), batches)
    got = ll.fold(with_ema, ll.init(model, opt, seed=seed), batches)
    slots = {k: x for k, x in got.slots.items() if k != SLOT}
    assert_trees_equal(got._replace(slots=slots), want)


def test_held_and_skipped_micro_batches_leave_the_average_alone() -> None:
    """Lone calls (the tensor-select path): the average moves only when an update is applied."""
    model = mlp(seed=4)
    step, opt = chain_step(model)
    state = ll.init(model, opt)
    batches = faulty_batches(9, bad={4})  # the second window holds a NaN
    counts, moved = [], []
    for b in batches:
        new = step(state, b)
        counts.append(int(new.slots[SLOT].count))
        before = step.init(state, b).slots[SLOT].params
        moved.append(not torch.equal(new.slots[SLOT].params["0.weight"], before["0.weight"]))
        state = new
    assert counts == [0, 0, 1, 1, 1, 1, 1, 1, 2]
    assert moved == [False, False, True, False, False, False, False, False, True]


def test_before_the_first_update_the_average_is_the_initial_params() -> None:
    model = mlp(seed=5)
    step, opt = chain_step(model)
    state = step.init(ll.init(model, opt), regression_batches([2])[0])
    assert_trees_equal(ll.ema_params(state), ll.init(model, opt).params)
    assert int(state.slots[SLOT].count) == 0
    assert all(
        e.data_ptr() != p.data_ptr()
        for e, p in zip(ll.ema_params(state).values(), state.params.values(), strict=True)
    )


def test_ema_is_pure_and_donation_gives_the_same_bits() -> None:
    model = mlp(batchnorm=True)
    opt = ll.optim.sgd(0.1, momentum=0.9)
    step = ll.chain(ll.clip(1.0), ll.ema(0.7))(ll.train_step(model, mse, opt))
    batches = regression_batches([4, 4, 4, 4])
    state = ll.init(model, opt, seed=0)
    for b in batches:
        state = assert_pure(step, state, b)
    donated = ll.fold(ll.donate(step), ll.init(model, opt, seed=0), batches)
    assert_trees_equal(donated, state)


def test_vmap_keeps_one_average_per_member() -> None:
    models = [mlp(seed=s) for s in range(3)]
    opt = ll.optim.adam(0.05)
    batches = regression_batches([4] * 6, seed=7)

    def make(model: nn.Module) -> ll.Step:
        return ll.chain(ll.accumulate(2), ll.ema(0.8))(ll.train_step(model, mse, opt))

    alone = [ll.fold(make(m), ll.init(m, opt, seed=i), batches) for i, m in enumerate(models)]
    step = make(models[0])
    start = ll.stack([step.init(ll.init(m, opt, seed=i), batches[0]) for i, m in enumerate(models)])
    together = ll.unstack(ll.fold(ll.vmap(step), start, batches))
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(ll.ema_params(a), ll.ema_params(b), rtol=1e-12, atol=1e-14)
        assert int(a.slots[SLOT].count) == 3
    assert not torch.allclose(
        ll.ema_params(together[0])["0.weight"], ll.ema_params(together[1])["0.weight"]
    )


def test_a_checkpoint_resumes_the_average(tmp_path) -> None:
    model = mlp(seed=6)
    step, opt = chain_step(model)
    batches = regression_batches([4] * 12, seed=8)
    whole = ll.fold(step, ll.init(model, opt, seed=0), batches)
    half = ll.fold(step, ll.init(model, opt, seed=0), batches[:6])
    assert isinstance(half.slots[SLOT], EmaState)
    ll.save(half, tmp_path / "half.safetensors")
    resumed = ll.fold(step, ll.load(tmp_path / "half.safetensors"), batches[6:])
    assert_trees_equal(resumed, whole)


def test_fit_trains_with_ema() -> None:
    model = mlp(seed=9)
    step, opt = chain_step(model)
    batches = regression_batches([4] * 9, seed=10)
    result = ll.fit(step, ll.init(model, opt), batches, batches[:2], max_epochs=2, progress=False)
    assert int(result.state.slots[SLOT].count) == int(result.state.step) == 6


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("value", "exc"),
    [(-0.1, ValueError), (1.5, ValueError), (math.nan, ValueError), ("0.9", TypeError)],
)
def test_ema_rejects_bad_decay(value: object, exc: type[Exception]) -> None:
    shown = repr(value)
    message = f"ema(decay={shown}): decay must be a real number in [0.0, 1.0], got {shown}."
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        ll.ema(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "after",
    [ll.accumulate(2), ll.skip_nonfinite(3), ll.loss_scale()],
    ids=["accumulate", "skip_nonfinite", "loss_scale"],
)
def test_ema_before_a_holding_transformer_raises(after: ll.Transformer) -> None:
    step = ll.train_step(mlp(), mse, ll.optim.sgd(0.1))
    message = (
        f"step must not have {after!r} after ema in its chain (an update it holds back would "
        "never reach the average, and a window it applies at a flush would bypass it)"
    )
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        ll.chain(ll.ema(0.9), after)(step)
    assert str(info.value).startswith("ema(0.9)(step=")
    assert str(info.value).endswith(f"Put ema last: chain(..., {after!r}, ..., ema(0.9)).")
    ll.chain(after, ll.ema(0.9))(step)  # the other order is fine
    ll.chain(ll.ema(0.9), ll.clip(1.0), ll.accumulate(1))(step)  # nothing held after it


def test_reading_the_average_of_a_state_without_one_raises() -> None:
    state = ll.init(mlp(), ll.optim.sgd(0.1))
    for func in (ll.ema_params, ll.with_ema_params):
        message = (
            f"{func.__name__}(state): the state has no moving average (no slot 'ema'). Put "
            "ll.ema(decay) in the step's chain and complete the state with it: "
            "step.init(state, batch), or run a step."
        )
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            func(state)
    with pytest.raises(TypeError, match=r"^ema_params\(state=\{\}\): state must be a looplib"):
        ll.ema_params({})  # type: ignore[arg-type]


def test_ema_twice_raises() -> None:
    step = ll.train_step(mlp(), mse, ll.optim.sgd(0.1))
    with pytest.raises(ValueError, match="must not already contain a transformer owning"):
        ll.chain(ll.ema(0.9), ll.ema(0.5))(step)
