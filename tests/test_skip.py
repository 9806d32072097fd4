"""Tests for skip_nonfinite: a step whose gradient or loss is not finite leaves the training
state as it was (but for the slot's counters).

Oracles: a hand-written ``torch.optim.SGD`` loop that skips the bad batches, and the laws
``fold(skip(step), xs) == fold(step, good(xs))`` (bit for bit, the skip slot and the random key's
counter aside: the key advances once per micro-batch, skipped or not) in the two scopes the chain
order gives under accumulation: a bad micro-batch dropped alone, or its whole window dropped.
The step never raises and never reads a device value; ``step.check``, ``fold`` and ``scan`` (at
their end) raise after too many consecutive skips.
"""

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

import looplib as ll
from looplib._skip import SLOT
from tests.helpers import (
    assert_pure,
    assert_snapshot_unchanged,
    assert_trees_equal,
    mlp,
    snapshot,
)

LR = 0.1

# A batch is (x, y, kind): kind 0 is a good batch; the others are the faults to inject.
GOOD, NAN_INPUT, INF_GRAD, NAN_LOSS_ONLY = 0, 1, 2, 3


def batch(seed: int, size: int = 3, kind: int = GOOD) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(size, 1, generator=gen, dtype=torch.float64)
    if kind == NAN_INPUT:
        x[0, 1] = math.nan
    return x, y, torch.tensor(kind)


def loss_fn(model: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y, kind = b
    loss = F.mse_loss(model(x), y)
    if int(kind) == INF_GRAD:
        # An infinite gradient with a finite loss: d/dp sqrt(p - p.detach()) at 0 is +inf.
        p = model[0].weight
        loss = loss + torch.sqrt((p - p.detach()).sum())
    elif int(kind) == NAN_LOSS_ONLY:
        # A NaN loss whose gradient is finite: the NaN does not depend on the params.
        loss = loss + torch.tensor(math.nan, dtype=loss.dtype)
    return loss


def setup(*transformers: ll.Transformer, momentum: float = 0.9):
    model = mlp()
    opt = ll.optim.sgd(LR, momentum=momentum)
    step = ll.train_step(model, loss_fn, opt)
    if transformers:
        step = ll.chain(*transformers)(step)
    return model, opt, step, ll.init(model, opt)


def fold(step: Any, state: ll.TrainState, batches: list[Any]) -> ll.TrainState:
    """One lone call per batch (the tensor-select path)."""
    for b in batches:
        state = step(state, b)
    return state


DRIVERS = {"calls": fold, "fold": ll.fold}


def without_skip_slot(state: ll.TrainState, *, metrics: bool = True) -> ll.TrainState:
    """The state without the skip slot and the key's counter (the key's seed is kept)."""
    slots = {k: x for k, x in state.slots.items() if k != SLOT}
    slots["rng"] = state.slots["rng"][:1]
    return state._replace(slots=slots, metrics=state.metrics if metrics else {})


def counters(state: ll.TrainState) -> tuple[int, int, int]:
    slot = state.slots[SLOT]
    return int(slot.consecutive), int(slot.total), int(slot.last_step)


# Sequences of batch kinds with no more than 2 bad batches in a row.
def no_three_bad_in_a_row(ks: list[int]) -> bool:
    run = 0
    for k in ks:
        run = run + 1 if k != GOOD else 0
        if run > 2:
            return False
    return True


runs = st.lists(
    st.sampled_from([GOOD, GOOD, NAN_INPUT, INF_GRAD, NAN_LOSS_ONLY]), min_size=1, max_size=9
).filter(no_three_bad_in_a_row)


# ------------------------------------------------------------------------------------- oracles
@given(runs)
def test_against_a_hand_written_loop_that_skips_bad_steps(ks: list[int]) -> None:
    model, _, step, state = setup(ll.skip_nonfinite(2))
    batches = [batch(i, kind=k) for i, k in enumerate(ks)]
    state = fold(step, state, batches)

    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    skipped = 0
    for b in batches:
        opt.zero_grad()
        loss = loss_fn(ref, b)
        loss.backward()
        grads = [p.grad for p in ref.parameters()]
        if not (torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)):
            skipped += 1
            continue
        opt.step()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-12, atol=1e-14)
    assert int(state.step) == len(ks) - skipped
    assert counters(state)[1] == skipped


@pytest.mark.parametrize("driver", sorted(DRIVERS))
@given(ks=runs)
def test_skipping_equals_training_on_the_good_batches_only(driver: str, ks: list[int]) -> None:
    """Metrics included: a skipped micro-batch leaves ``state.metrics`` as they were."""
    _, _, step, state = setup(ll.skip_nonfinite(2), ll.clip(0.5))
    _, _, plain, _ = setup(ll.clip(0.5))
    batches = [batch(i, kind=k) for i, k in enumerate(ks)]
    good = [b for b, k in zip(batches, ks, strict=True) if k == GOOD]
    out = DRIVERS[driver](step, state, batches)
    assert_trees_equal(
        without_skip_slot(out),
        without_skip_slot(plain.init(fold(plain, state, good), batches[0])),
    )
    assert int(out.slots["rng"][1]) == len(batches)


# --------------------------------------------------------------------------- one bad step
@pytest.mark.parametrize("kind", [NAN_INPUT, INF_GRAD, NAN_LOSS_ONLY], ids=["nan", "inf", "loss"])
def test_a_bad_step_changes_nothing_but_the_counters(kind: int) -> None:
    _, _, step, state = setup(ll.skip_nonfinite(3))
    state = fold(step, state, [batch(0), batch(1)])
    assert counters(state) == (0, 0, -1)
    after = assert_pure(step, state, batch(2, kind=kind))
    for field in ("params", "buffers", "opt_state", "step", "metrics"):
        assert_trees_equal(getattr(after, field), getattr(state, field))
    assert torch.equal(after.slots["rng"], state.slots["rng"] + torch.tensor([0, 1]))
    assert counters(after) == (1, 1, 2)  # last_step: the value of state.step when skipped
    again = step(after, batch(3, kind=kind))
    assert counters(again) == (2, 2, 2)
    good = step(again, batch(4))
    assert counters(good) == (0, 2, 2)  # a good step resets the run, not the total
    assert int(good.step) == 3


def test_a_nan_loss_with_a_finite_gradient_is_skipped() -> None:
    _, _, step, state = setup(ll.skip_nonfinite(1))
    model = mlp()
    b = batch(0, kind=NAN_LOSS_ONLY)
    loss = loss_fn(model, b)
    loss.backward()
    assert math.isnan(float(loss.detach()))
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    after = step(state, b)
    assert_trees_equal(after.params, state.params)
    assert counters(after)[1] == 1


# --------------------------------------------------------------------------- too many in a row
def too_many_message(limit: int, last_step: int = 2) -> str:
    return "^" + re.escape(
        f"skip_nonfinite({limit}): {limit + 1} consecutive non-finite gradients, the last at "
        f"step {last_step} (optimizer updates applied so far); the error's .state holds the last "
        "good params."
    )


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_check_raises_after_max_consecutive_plus_one_bad_steps(limit: int) -> None:
    """The step itself never raises (it reads no device value); ``step.check`` does, once the
    slot shows more than ``max_consecutive`` skips in a row."""
    _, _, step, state = setup(ll.skip_nonfinite(limit))
    state = fold(step, state, [batch(0), batch(1)])
    for i in range(limit):
        state = step(state, batch(10 + i, kind=NAN_INPUT))
    step.check(state)  # at the limit: fine
    last = step(state, batch(99, kind=INF_GRAD))  # one more: the step still returns
    beyond = step(last, batch(100, kind=NAN_LOSS_ONLY))
    assert counters(beyond) == (limit + 2, limit + 2, 2)
    with pytest.raises(ll.NonFiniteGradientError, match=too_many_message(limit)) as info:
        step.check(last)
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert err.state is last
    assert all(bool(torch.isfinite(p).all()) for p in err.state.params.values())
    assert_trees_equal(err.state.params, state.params)
    assert counters(err.state) == (limit + 1, limit + 1, 2)


@pytest.mark.parametrize("limit", [0, 1, 3])
@pytest.mark.parametrize("func", ["fold", "scan"])
def test_fold_and_scan_raise_at_their_end(func: str, limit: int) -> None:
    """They run every batch (no host read on the way) and check the state once, at the end."""
    _, _, step, state = setup(ll.skip_nonfinite(limit))
    bad = [batch(10 + i, kind=NAN_INPUT) for i in range(limit + 1)]
    batches = [batch(0), batch(1), *bad]
    snap = snapshot(state)
    with pytest.raises(ll.NonFiniteGradientError, match=too_many_message(limit)) as info:
        if func == "fold":
            ll.fold(step, state, batches)
        else:
            ll.scan(step, state, batches)
    err = info.value
    assert counters(err.state) == (limit + 1, limit + 1, 2)
    assert int(err.state.slots["rng"][1]) == len(batches)  # every batch ran
    assert_trees_equal(err.state.params, ll.fold(step, state, batches[:2]).params)
    # The caller's state is never written (fold donates only the states it made).
    assert_snapshot_unchanged(snap)


def test_good_steps_between_bad_ones_never_raise() -> None:
    _, _, step, state = setup(ll.skip_nonfinite(1))
    kinds_ = [NAN_INPUT, GOOD, INF_GRAD, GOOD, NAN_LOSS_ONLY, GOOD]
    state = fold(step, state, [batch(i, kind=k) for i, k in enumerate(kinds_)])
    assert counters(state) == (0, 3, 2)
    assert int(state.step) == 3


# --------------------------------------------------------------------------- scope
@pytest.mark.parametrize("driver", sorted(DRIVERS))
@given(ks=runs, k=st.integers(2, 3))
def test_before_accumulate_a_bad_micro_batch_is_dropped_alone(
    driver: str, ks: list[int], k: int
) -> None:
    """``chain(skip_nonfinite(), accumulate(K))``: the window closes after K good ones, whether
    the step is called batch by batch or folded a window at a time."""
    _, _, step, state = setup(ll.skip_nonfinite(2), ll.accumulate(k))
    _, _, plain, _ = setup(ll.accumulate(k))
    batches = [batch(i, size=2 + i % 3, kind=kind) for i, kind in enumerate(ks)]
    good = [b for b, kind in zip(batches, ks, strict=True) if kind == GOOD]
    out = DRIVERS[driver](step, state, batches)
    want = plain.init(fold(plain, state, good), batches[0])
    assert_trees_equal(without_skip_slot(out), without_skip_slot(want))
    assert counters(out)[1] == len(ks) - len(good)
    # ... and flush closes the window of good micro-batches the same way.
    assert_trees_equal(without_skip_slot(step.flush(out)), without_skip_slot(plain.flush(want)))


@pytest.mark.parametrize("driver", sorted(DRIVERS))
@given(
    bad_windows=st.lists(st.booleans(), min_size=1, max_size=4),
    k=st.integers(2, 3),
    data=st.data(),
)
def test_after_accumulate_a_bad_window_is_dropped_whole(
    driver: str, bad_windows: list[bool], k: int, data: Any
) -> None:
    """``chain(accumulate(K), skip_nonfinite())``: one bad micro-batch spoils its window."""
    _, _, step, state = setup(ll.accumulate(k), ll.skip_nonfinite(len(bad_windows)))
    _, _, plain, _ = setup(ll.accumulate(k))
    batches, good = [], []
    for w, bad in enumerate(bad_windows):
        where = data.draw(st.integers(0, k - 1)) if bad else -1
        # The stage sees the gradient of the window and the loss of its last micro-batch: a NaN
        # loss with a finite gradient counts only there (earlier, it leaves the gradient finite).
        faults = [NAN_INPUT, INF_GRAD] + ([NAN_LOSS_ONLY] if where == k - 1 else [])
        kind = data.draw(st.sampled_from(faults))
        window = [
            batch(10 * w + i, size=2 + i, kind=kind if i == where else GOOD) for i in range(k)
        ]
        batches += window
        if not bad:
            good += window
    out = DRIVERS[driver](step, state, batches)
    want = plain.init(fold(plain, state, good), batches[0])
    # The metrics too when the last window was good; after a bad one they are those of its
    # open window before the closing micro-batch (a skipped micro-batch leaves them as they were).
    metrics = not bad_windows[-1]
    assert_trees_equal(
        without_skip_slot(out, metrics=metrics), without_skip_slot(want, metrics=metrics)
    )
    assert counters(out)[1] == sum(bad_windows)  # counted once per window, not per micro-batch
    assert int(out.slots["accumulate"].count) == 0  # the window is reset either way


def test_a_skipped_window_in_a_checkpoint_resumes_its_counters(tmp_path) -> None:
    _, _, step, state = setup(ll.accumulate(2), ll.skip_nonfinite(1))
    state = fold(step, state, [batch(0), batch(1, kind=NAN_INPUT), batch(2)])
    ll.save(state, tmp_path / "s.ll")
    loaded = ll.load(tmp_path / "s.ll")
    assert isinstance(loaded.slots[SLOT], ll.SkipState)
    assert_trees_equal(step(loaded, batch(3)), step(state, batch(3)))


# --------------------------------------------------------------------------- and clipping
def test_it_checks_before_clipping_an_infinite_gradient() -> None:
    """With clip after it, an inf gradient is skipped; clip alone would make the params NaN."""
    _, _, step, state = setup(ll.skip_nonfinite(2), ll.track_norm(2, per_param=False), ll.clip(1.0))
    after = step(state, batch(0, kind=INF_GRAD))
    assert_trees_equal(after.params, state.params)
    assert counters(after) == (1, 1, 0)
    # The norm is not recorded for a skipped gradient: it never reached track_norm.
    assert math.isnan(float(after.metrics["grad_2.0_norm_total"]))

    _, _, clip_only, _ = setup(ll.clip(1.0))
    ruined = clip_only(state, batch(0, kind=INF_GRAD))
    assert any(bool(p.isnan().any()) for p in ruined.params.values())


def test_after_clip_it_still_skips_the_nan_that_clipping_made() -> None:
    _, _, step, state = setup(ll.clip(1.0), ll.skip_nonfinite(2))
    after = step(state, batch(0, kind=INF_GRAD))
    assert_trees_equal(after.params, state.params)
    assert counters(after)[1] == 1


# --------------------------------------------------------------------------- purity, tbptt
@given(runs)
def test_never_changes_its_input(ks: list[int]) -> None:
    _, _, step, state = setup(ll.skip_nonfinite(2), ll.accumulate(2), ll.clip(0.5))
    for i, k in enumerate(ks):
        state = assert_pure(step, state, batch(i, kind=k))


def test_under_tbptt_a_bad_chunk_is_skipped_alone() -> None:
    class Rnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.GRU(2, 3, batch_first=True)
            self.head = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor, h: Any) -> tuple[torch.Tensor, Any]:
            out, h = self.cell(x, h)
            return self.head(out).squeeze(-1), h

    def rnn_loss(model: nn.Module, b: Any, carry: Any) -> tuple[Any, ...]:
        x, y = b
        pred, h = model(x, carry)
        return F.mse_loss(pred, y), {}, h

    torch.manual_seed(0)
    model = Rnn().double()
    opt = ll.optim.sgd(LR)
    step = ll.chain(ll.tbptt_split(2), ll.skip_nonfinite(1))(ll.train_step(model, rnn_loss, opt))
    x = torch.randn(3, 6, 2, dtype=torch.float64)
    y = torch.randn(3, 6, dtype=torch.float64)
    y_bad = y.clone()
    y_bad[0, 3] = math.nan  # in the second of three chunks; the carry stays finite
    state = ll.init(model, opt)
    after = step(state, (x, y_bad))
    assert int(after.step) == 2
    assert counters(after) == (0, 1, 1)
    assert all(bool(torch.isfinite(p).all()) for p in after.params.values())


def test_a_skipped_step_leaves_batchnorm_buffers_alone() -> None:
    # The base step keeps the buffers of any micro-batch whose loss is not finite.
    model = mlp(batchnorm=True)
    opt = ll.optim.sgd(LR)
    step = ll.skip_nonfinite(2)(ll.train_step(model, loss_fn, opt))
    state = step(ll.init(model, opt), batch(0))
    after = step(state, batch(1, kind=NAN_INPUT))
    assert_trees_equal(after.buffers, state.buffers)
