"""``loss_scale``: ``torch.amp.GradScaler`` as the oracle, in a hand-written loop (float32, forced
overflows, with and without accumulation), checked after every update: params, scale and growth
tracker; ``torch._amp_update_scale_`` as the oracle of the scale's rule; laws: a power-of-two
scale without overflow changes nothing but the slot (bit for bit), an overflow changes nothing but
the scale; purity, ``compile``, ``vmap`` (each member its own scale); pinned errors."""

from __future__ import annotations

import copy
import itertools
import math
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import looplib as ll
from looplib._loss_scale import SLOT, LossScaleState, update_scale
from tests.helpers import assert_pure, assert_trees_equal, mlp, mse, regression_batches

F32 = torch.float32


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def batches_with_overflows(sizes: list[int], bad: set[int], seed: int = 0) -> list[Any]:
    """float32 batches; those in ``bad`` hold an inf input, so their gradient overflows."""
    batches = regression_batches(sizes, seed=seed, dtype=F32)
    for i in bad:
        x, y = batches[i]
        x = x.clone()
        x[0, 1] = math.inf
        batches[i] = (x, y)
    return batches


def scale_and_tracker(state: ll.TrainState) -> tuple[float, int]:
    slot: LossScaleState = state.slots[SLOT]
    return float(slot.scale), int(slot.growth_tracker)


SCALER: dict[str, Any] = {
    "init_scale": 2.0**10,
    "growth_factor": 2.0,
    "backoff_factor": 0.25,
    "growth_interval": 3,
}


def torch_run(model: nn.Module, windows: list[list[Any]], scaler_args: dict[str, Any]):
    """GradScaler's documented loop (accumulation as in its docs: the loss of each micro-batch
    scaled by its share of the window); yields the params, scale and tracker after each step."""
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", **scaler_args)
    for window in windows:
        total = sum(len(b[0]) for b in window)
        opt.zero_grad()
        for b in window:
            scaler.scale(loss_fn(ref, b) * (len(b[0]) / total)).backward()
        scaler.step(opt)
        scaler.update()
        params = {k: p.detach().clone() for k, p in ref.named_parameters()}
        yield params, float(scaler.get_scale()), int(scaler._growth_tracker)


# --------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("driver", ["calls", "fold"])
def test_against_grad_scaler_step_by_step(driver: str) -> None:
    """20 steps: growth every 3 good ones, backoff (and a tracker reset) at each overflow."""
    model = mlp(seed=1, dtype=F32)
    batches = batches_with_overflows([4] * 20, bad={2, 9, 10, 17})
    opt = ll.optim.adam(0.01)
    step = ll.loss_scale(**SCALER)(ll.train_step(model, loss_fn, opt))
    state = ll.init(model, opt)
    seen = []
    expected = torch_run(model, [[b] for b in batches], SCALER)
    for b, (params, scale, tracker) in zip(batches, expected, strict=True):
        state = step(state, b) if driver == "calls" else ll.fold(step, state, [b])
        assert scale_and_tracker(state) == (scale, tracker)
        assert float(state.metrics["loss_scale"]) == scale
        torch.testing.assert_close(state.params, params, rtol=1e-5, atol=1e-6)
        seen.append((scale, tracker))
    assert int(state.step) == 16
    assert seen[:4] == [(1024.0, 1), (1024.0, 2), (256.0, 0), (256.0, 1)]
    assert any(b[0] > a[0] for a, b in itertools.pairwise(seen))  # it grew too


@pytest.mark.parametrize("k", [2, 3])
def test_against_grad_scaler_under_accumulation(k: int) -> None:
    """``chain(accumulate(k), loss_scale(), clip(inf))``: one unscale, one check and one scale
    update per window; a window with one overflowing micro-batch is skipped whole."""
    model = mlp(seed=2, dtype=F32)
    sizes = [3, 5, 2, 4, 4, 1] * 5
    batches = batches_with_overflows(sizes, bad={1, 13, 14})
    windows = [batches[i : i + k] for i in range(0, len(batches), k)]
    opt = ll.optim.adam(0.01)
    step = ll.chain(ll.accumulate(k), ll.loss_scale(**SCALER), ll.clip(math.inf))(
        ll.train_step(model, loss_fn, opt)
    )
    state = ll.init(model, opt)
    skipped = 0
    for window, (params, scale, tracker) in zip(
        windows, torch_run(model, windows, SCALER), strict=True
    ):
        before = int(state.step) if SLOT in state.slots else 0
        state = ll.fold(step, state, window)
        skipped += int(state.step) == before
        assert scale_and_tracker(state) == (scale, tracker)
        torch.testing.assert_close(state.params, params, rtol=1e-5, atol=1e-6)
    assert skipped == (2 if k == 3 else 3)


@given(
    scale=st.sampled_from([1.0, 3.0, 2.0**16, 2.0**127, 3.0e38, 1e-30]),
    tracker=st.integers(0, 6),
    found_inf=st.booleans(),
    growth_factor=st.sampled_from([2.0, 1.5, 10.0]),
    backoff_factor=st.sampled_from([0.5, 0.3, 1e-3]),
    growth_interval=st.integers(1, 7),
)
def test_update_scale_equals_amp_update_scale(
    scale: float,
    tracker: int,
    found_inf: bool,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
) -> None:
    tracker = min(tracker, growth_interval - 1)
    slot = LossScaleState(torch.tensor(scale, dtype=F32), torch.tensor(tracker, dtype=torch.int32))
    theirs_scale, theirs_tracker = slot.scale.clone(), slot.growth_tracker.clone()
    torch._amp_update_scale_(
        theirs_scale,
        theirs_tracker,
        torch.tensor(float(found_inf)),
        growth_factor,
        backoff_factor,
        growth_interval,
    )
    ours = update_scale(
        slot, torch.tensor(found_inf), growth_factor, backoff_factor, growth_interval
    )
    assert_trees_equal(ours, LossScaleState(theirs_scale, theirs_tracker))


# --------------------------------------------------------------------------- laws


@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_a_power_of_two_scale_without_overflow_changes_nothing(sizes: list[int], seed: int) -> None:
    """Scaling by 2**k and unscaling are exact: the run equals the unscaled one bit for bit."""
    model = mlp(seed=seed % 3, dropout=0.2)
    opt = ll.optim.adam(0.1)
    base = ll.chain(ll.accumulate(2), ll.clip(0.5))(ll.train_step(model, mse, opt))
    scaled = ll.chain(ll.accumulate(2), ll.loss_scale(2.0**12, growth_interval=2), ll.clip(0.5))(
        ll.train_step(model, mse, opt)
    )
    batches = regression_batches(sizes, seed=seed)
    want = ll.fold(base, ll.init(model, opt, seed=seed), batches)
    got = ll.fold(scaled, ll.init(model, opt, seed=seed), batches)
    updates = int(want.step)
    scale = 2.0 ** (12 + updates // 2)
    assert float(got.slots[SLOT].scale) == scale
    # An open window holds the scaled gradients' sums: exactly the unscaled ones times the scale.
    window = got.slots["accumulate"]
    window = window._replace(grads={k: g / scale for k, g in window.grads.items()})
    metrics = {k: m for k, m in got.metrics.items() if k != "loss_scale"}
    slots = {k: s for k, s in got.slots.items() if k != SLOT} | {"accumulate": window}
    assert_trees_equal(got._replace(metrics=metrics, slots=slots), want)


def test_an_overflow_changes_nothing_but_the_scale() -> None:
    model = mlp(seed=3, dtype=F32)
    opt = ll.optim.sgd(0.1, momentum=0.9)
    step = ll.chain(ll.loss_scale(**SCALER), ll.track_norm())(ll.train_step(model, loss_fn, opt))
    good, bad = batches_with_overflows([4, 4], bad={1})
    state = step(ll.init(model, opt), good)
    after = assert_pure(step, state, bad)
    slots = {k: s for k, s in after.slots.items() if k not in (SLOT, "rng")}
    metrics = {k: m for k, m in after.metrics.items() if k != "loss_scale"}
    for field in ("params", "buffers", "opt_state", "step"):
        assert_trees_equal(getattr(after, field), getattr(state, field))
    assert_trees_equal(metrics, {k: m for k, m in state.metrics.items() if k != "loss_scale"})
    assert slots == {k: s for k, s in state.slots.items() if k not in (SLOT, "rng")}
    assert scale_and_tracker(after) == (256.0, 0)
    assert float(after.metrics["loss_scale"]) == 256.0


def test_stages_after_it_see_the_unscaled_gradient() -> None:
    model = mlp(seed=4, dtype=F32)
    opt = ll.optim.sgd(0.1)
    batch = regression_batches([6], dtype=F32)[0]
    plain = ll.track_norm(per_param=False)(ll.train_step(model, loss_fn, opt))
    scaled = ll.chain(ll.loss_scale(), ll.track_norm(per_param=False))(
        ll.train_step(model, loss_fn, opt)
    )
    want = plain(ll.init(model, opt), batch).metrics["grad_2.0_norm_total"]
    got = scaled(ll.init(model, opt), batch).metrics["grad_2.0_norm_total"]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_the_metric_and_slot_exist_from_init() -> None:
    model = mlp(dtype=F32)
    opt = ll.optim.sgd(0.1)
    step = ll.loss_scale(8.0)(ll.train_step(model, loss_fn, opt))
    state = step.init(ll.init(model, opt), regression_batches([2], dtype=F32)[0])
    assert scale_and_tracker(state) == (8.0, 0)
    assert state.slots[SLOT].scale.dtype == F32
    assert state.slots[SLOT].growth_tracker.dtype == torch.int32
    assert float(state.metrics["loss_scale"]) == 8.0
    assert state.metrics["loss_scale"] is not state.slots[SLOT].scale


def test_compiled_equals_eager() -> None:
    model = mlp(seed=5, dtype=F32)
    opt = ll.optim.adam(0.01)
    step = ll.chain(ll.accumulate(2), ll.loss_scale(**SCALER), ll.clip(1.0))(
        ll.train_step(model, loss_fn, opt)
    )
    batches = batches_with_overflows([4] * 12, bad={3})
    eager = ll.fold(step, ll.init(model, opt, seed=0), batches)
    compiled = ll.fold(ll.compile(step, backend="aot_eager"), ll.init(model, opt, seed=0), batches)
    assert scale_and_tracker(compiled) == scale_and_tracker(eager)
    assert int(compiled.step) == int(eager.step) == 5
    torch.testing.assert_close(compiled.params, eager.params, rtol=1e-6, atol=1e-7)


def test_vmap_gives_every_member_its_own_scale() -> None:
    """Member 0's data overflows once, member 1's never: only member 0 backs off and skips."""
    model = mlp(seed=6, dtype=F32)
    opt = ll.optim.adam(0.01)
    step = ll.loss_scale(**SCALER)(ll.train_step(model, loss_fn, opt))
    mine = batches_with_overflows([4] * 5, bad={1}, seed=0)
    theirs = batches_with_overflows([4] * 5, bad=set(), seed=10)
    paired = [
        tuple(torch.stack(t) for t in zip(a, b, strict=True))
        for a, b in zip(mine, theirs, strict=True)
    ]
    start = [step.init(ll.init(model, opt, seed=i), b) for i, b in enumerate([mine[0], theirs[0]])]
    together = ll.unstack(ll.fold(ll.vmap(step, batch_axis=0), ll.stack(start), paired))
    for member, data, i in zip(together, (mine, theirs), (0, 1), strict=True):
        alone = ll.fold(step, ll.init(model, opt, seed=i), data)
        assert scale_and_tracker(member) == scale_and_tracker(alone)
        torch.testing.assert_close(member.params, alone.params, rtol=1e-6, atol=1e-7)
    assert scale_and_tracker(together[0]) == (512.0, 0)  # backed off, then grew
    assert scale_and_tracker(together[1]) == (2048.0, 2)
    assert [int(m.step) for m in together] == [4, 5]


# --------------------------------------------------------------------------- order and errors


def test_loss_scale_before_accumulate_raises() -> None:
    step = ll.train_step(mlp(), mse, ll.optim.sgd(0.1))
    message = (
        "loss_scale(65536.0)(step=chain(accumulate(4))(train_step(Sequential, mse))): step must "
        "not have accumulate(4) after loss_scale in its chain (GradScaler keeps one scale "
        "through a window and checks the window's summed gradient once), got "
        "chain(accumulate(4))(train_step(Sequential, mse)). Put loss_scale right after it: "
        "chain(accumulate(4), loss_scale(65536.0), ...)."
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        ll.chain(ll.loss_scale(), ll.accumulate(4))(step)
    ll.chain(ll.loss_scale(), ll.accumulate(1))(step)  # accumulate(1) is the identity


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        (
            {"init_scale": 0},
            ValueError,
            "loss_scale(init_scale=0): init_scale must be a positive real number, got 0.",
        ),
        (
            {"init_scale": math.inf},
            ValueError,
            "loss_scale(init_scale=inf): init_scale must be a positive real number, got inf.",
        ),
        (
            {"init_scale": 1e39},
            ValueError,
            "loss_scale(init_scale=1e+39): init_scale must be a positive number below float32's "
            "max, got 1e+39.",
        ),
        (
            {"growth_factor": 1.0},
            ValueError,
            "loss_scale(growth_factor=1.0): growth_factor must be a finite real number > 1, "
            "got 1.0.",
        ),
        (
            {"growth_factor": "2"},
            TypeError,
            "loss_scale(growth_factor='2'): growth_factor must be a finite real number, got '2'.",
        ),
        (
            {"backoff_factor": 1.0},
            ValueError,
            "loss_scale(backoff_factor=1.0): backoff_factor must be a real number in (0.0, 1.0), "
            "got 1.0.",
        ),
        (
            {"backoff_factor": 0},
            ValueError,
            "loss_scale(backoff_factor=0): backoff_factor must be a real number in (0.0, 1.0), "
            "got 0.",
        ),
        (
            {"growth_interval": 0},
            ValueError,
            "loss_scale(growth_interval=0): growth_interval must be a positive int, got 0.",
        ),
        (
            {"growth_interval": 2.0},
            TypeError,
            "loss_scale(growth_interval=2.0): growth_interval must be a positive int, got 2.0.",
        ),
    ],
)
def test_loss_scale_rejects_bad_arguments(kwargs: dict[str, Any], exc, message: str) -> None:
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        ll.loss_scale(**kwargs)


def test_loss_scale_repr_names_what_differs_from_the_defaults() -> None:
    assert repr(ll.loss_scale()) == "loss_scale(65536.0)"
    assert repr(ll.loss_scale(8, growth_interval=3)) == "loss_scale(8.0, growth_interval=3)"
    assert repr(ll.loss_scale(backoff_factor=0.25, growth_factor=4)) == (
        "loss_scale(65536.0, growth_factor=4.0, backoff_factor=0.25)"
    )
