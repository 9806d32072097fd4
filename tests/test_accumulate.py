"""``accumulate``: a hand-written imperative loop as the oracle, and the laws of accumulation.

The laws: ``accumulate(1)`` is the identity; for any partition of a batch into micro-batches,
accumulating over the parts gives the update of one step on the whole batch; nothing but the
slot moves during the first ``K - 1`` micro-batches; and the partial-window policies of
``step.flush``.
"""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import looplib as ll
from tests.helpers import (
    assert_params_close,
    assert_pure,
    assert_same_structure,
    assert_trees_close,
    assert_trees_equal,
    concat,
    mlp,
    mse,
    regression_batch,
    regression_batches,
)

# --------------------------------------------------------------------------- the oracle


def imperative_accumulate_track_clip(
    model: nn.Module, micro: list, k: int, max_norm: float, lr: float, momentum: float
) -> list[dict[str, torch.Tensor]]:
    """The classic loop: each micro-batch's mean loss scaled by ``n_i / sum(n)`` of its window,
    backward into ``.grad``; then record norms, ``clip_grad_norm_``, ``step`` and ``zero_grad``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    recorded = []
    for start in range(0, len(micro) - k + 1, k):
        window = micro[start : start + k]
        total = sum(len(x) for x, _ in window)
        for batch in window:
            (mse(model, batch) * (len(batch[0]) / total)).backward()
        norms = {f"grad_2.0_norm/{n}": p.grad.norm(2) for n, p in model.named_parameters()}
        squares = sum(float(p.grad.pow(2).sum()) for p in model.parameters())
        norms["grad_2.0_norm_total"] = torch.tensor(squares**0.5, dtype=torch.float64)
        recorded.append(norms)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
    return recorded


def test_accumulate_track_clip_matches_the_imperative_loop() -> None:
    k, max_norm = 3, 1.2
    model = mlp(seed=5)
    ref = copy.deepcopy(model)
    sizes = [3, 5, 2, 4, 6, 1, 7, 2, 3] * 3  # 27 micro-batches: 9 windows of uneven sizes
    micro = regression_batches(sizes, seed=11)

    opt = ll.optim.sgd(0.1, momentum=0.9)
    step = ll.chain(ll.accumulate(k), ll.track_norm(2), ll.clip(max_norm))(
        ll.train_step(model, mse, opt)
    )
    state, metrics = ll.scan(step, ll.init(model, opt), micro)
    expected = imperative_accumulate_track_clip(ref, micro, k, max_norm, 0.1, 0.9)

    assert int(state.step) == len(micro) // k
    assert_params_close(state, ref)
    totals = [float(m["grad_2.0_norm_total"]) for m in expected]
    assert min(totals) < max_norm < max(totals), "the test should clip some updates, not all"
    # scan hands a looplib step whole windows: one metrics entry per update.
    assert len(metrics) == len(expected)
    for got, want in zip(metrics, expected, strict=True):
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-12, msg=key)


# --------------------------------------------------------------------------- laws


@given(
    sizes=st.lists(st.integers(2, 6), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    adam=st.booleans(),
)
def test_accumulate_1_is_the_identity(sizes: list[int], seed: int, adam: bool) -> None:
    model = mlp(seed=seed % 7, batchnorm=True)
    opt = ll.optim.adam(0.05) if adam else ll.optim.sgd(0.1, momentum=0.5)
    base = ll.train_step(model, mse, opt)
    batches = regression_batches(sizes, seed=seed)
    # Randomness is keyed by the state: the two runs start from the same key.
    want = ll.fold(base, ll.init(model, opt, seed=seed), batches)
    got = ll.fold(ll.accumulate(1)(base), ll.init(model, opt, seed=seed), batches)
    assert_trees_equal(got, want)


def partitions(total_min: int = 1, total_max: int = 12):
    """A batch size and a partition of it into consecutive parts of any sizes (each >= 1)."""

    @st.composite
    def build(draw):
        n = draw(st.integers(total_min, total_max))
        cuts = draw(st.sets(st.integers(1, n - 1), max_size=n - 1)) if n > 1 else set()
        bounds = [0, *sorted(cuts), n]
        return [b - a for a, b in itertools.pairwise(bounds)]

    return build()


@given(sizes=partitions(), seed=st.integers(0, 2**16), adam=st.booleans())
def test_any_partition_equals_one_step_on_the_concatenation(
    sizes: list[int], seed: int, adam: bool
) -> None:
    """Weighting each part by its size makes the window's gradient the whole batch's mean
    gradient. Float64 with random data: equal up to reassociation of the sums."""
    model = mlp(seed=seed % 5)
    opt = ll.optim.adam(0.05) if adam else ll.optim.sgd(0.3, momentum=0.9)
    step = ll.train_step(model, mse, opt)
    whole = regression_batch(sum(sizes), seed=seed)
    parts = [tuple(t[a : a + n] for t in whole) for a, n in zip(_starts(sizes), sizes, strict=True)]

    one = step(ll.init(model, opt), whole)
    acc = ll.fold(ll.accumulate(len(parts))(step), ll.init(model, opt), parts)
    assert int(acc.step) == 1
    if len(parts) > 1:  # accumulate(1) is the identity and keeps no slot
        assert int(acc.slots["accumulate"].count) == 0
    assert_trees_close(acc.params, one.params)
    assert_trees_close(acc.opt_state, one.opt_state)


def _starts(sizes: list[int]) -> list[int]:
    out, a = [], 0
    for n in sizes:
        out.append(a)
        a += n
    return out


@st.composite
def dyadic_partitions(draw, total: int = 16):
    """A partition of ``total`` (a power of two) into parts whose sizes are powers of two."""
    parts, left = [], total
    while left:
        size = draw(st.sampled_from([s for s in (1, 2, 4, 8, 16) if s <= left]))
        parts.append(size)
        left -= size
    return draw(st.permutations(parts))


@given(sizes=dyadic_partitions(), seed=st.integers(0, 2**16))
def test_partition_law_is_bit_exact_with_dyadic_arithmetic(sizes: list[int], seed: int) -> None:
    """Bit for bit with small-integer data, dyadic params, ReLU and SGD with lr = 1/8 in float64.

    Every sum is then exact, so reassociation cannot show. The part sizes must be powers of two
    (and so the total): the mean's backward divides by ``n_i`` and the window divides the
    weighted sum by ``sum(n_i)``; ``(g / 3) * 3`` is not ``g`` in floating point, so for other
    sizes the law holds only up to rounding (the test above).
    """
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-4, 5, p.shape, generator=gen).double() / 4)
    x = torch.randint(-3, 4, (sum(sizes), 3), generator=gen).double()
    y = torch.randint(-3, 4, (sum(sizes), 1), generator=gen).double()
    parts = [(x[a : a + n], y[a : a + n]) for a, n in zip(_starts(sizes), sizes, strict=True)]

    opt = ll.optim.sgd(0.125)
    step = ll.train_step(model, mse, opt)
    one = step(ll.init(model, opt), (x, y))
    acc = ll.fold(ll.accumulate(len(parts))(step), ll.init(model, opt), parts)
    assert_trees_equal(acc.params, one.params)


@given(k=st.integers(2, 5), seed=st.integers(0, 2**16), adam=st.booleans())
def test_nothing_but_the_slot_moves_inside_a_window(k: int, seed: int, adam: bool) -> None:
    model = mlp(seed=seed % 3, batchnorm=True)
    lr = lambda count: 0.1 / (1.0 + count.double())  # noqa: E731
    opt = ll.optim.adam(lr) if adam else ll.optim.sgd(lr, momentum=0.9)
    step = ll.accumulate(k)(ll.train_step(model, mse, opt))
    batches = regression_batches([3] * (k - 1), seed=seed)
    start = step.init(ll.init(model, opt), batches[0])
    state = start
    for i, batch in enumerate(batches):
        state = assert_pure(step, state, batch)
        assert_trees_equal(state.params, start.params)
        assert_trees_equal(state.opt_state, start.opt_state)
        assert int(state.step) == 0
        assert int(state.slots["accumulate"].count) == i + 1
        assert float(state.slots["accumulate"].weight) == 3 * (i + 1)
        # BatchNorm's statistics are not optimizer state: they follow every forward pass.
        assert not torch.equal(state.buffers["1.running_mean"], start.buffers["1.running_mean"])
    state = step(state, regression_batch(3, seed=seed + k))
    assert int(state.step) == 1 and int(state.opt_state.count) == 1
    assert int(state.slots["accumulate"].count) == 0
    assert float(state.slots["accumulate"].weight) == 0
    assert all(not g.any() for g in state.slots["accumulate"].grads.values())


def test_the_first_update_uses_the_schedule_at_count_zero() -> None:
    model = mlp()
    seen = regression_batches([2, 3, 4], seed=1)
    lr = lambda count: 0.5 * 0.1 ** count.double()  # noqa: E731
    opt = ll.optim.sgd(lr)
    acc = ll.fold(ll.accumulate(3)(ll.train_step(model, mse, opt)), ll.init(model, opt), seen)
    one = ll.train_step(model, mse, ll.optim.sgd(0.5))(ll.init(model, opt), concat(seen))
    assert_trees_close(acc.params, one.params)


@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=11),
    k=st.integers(2, 4),
    seed=st.integers(0, 2**16),
)
def test_a_stream_is_cut_into_consecutive_windows(sizes: list[int], k: int, seed: int) -> None:
    """Over a stream of M micro-batches, accumulate(K) steps after each K of them: it equals
    plain steps on the concatenation of each window, and the rest stays open in the slot."""
    model = mlp(seed=1)
    opt = ll.optim.sgd(0.2, momentum=0.9)
    base = ll.train_step(model, mse, opt)
    micro = regression_batches(sizes, seed=seed)
    windows = [concat(micro[i : i + k]) for i in range(0, len(micro) - k + 1, k)]
    got = ll.fold(ll.accumulate(k)(base), ll.init(model, opt), micro)
    want = ll.fold(base, ll.init(model, opt), windows)
    assert int(got.step) == len(micro) // k
    assert int(got.slots["accumulate"].count) == len(micro) % k
    assert float(got.slots["accumulate"].weight) == sum(sizes[len(windows) * k :])
    assert_trees_close(got.params, want.params)
    assert_trees_close(got.opt_state, want.opt_state)


# --------------------------------------------------------------------------- metrics and paths


def mse_with_mae(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    x, y = batch
    pred = model(x)
    return torch.nn.functional.mse_loss(pred, y), {"mae": (pred - y).abs().mean()}


@pytest.mark.parametrize("driver", ["fold", "calls"])
def test_the_metrics_are_the_window_mean_weighted_by_samples(driver: str) -> None:
    """Micro-batches of 4 and 12 samples with losses L1, L2 (at the window's params): while the
    window is open the metrics are those of the micro-batches so far; once it closes, the
    weighted mean ``(4 L1 + 12 L2) / 16``, with ``weight`` the window's total."""
    model = mlp(seed=3)
    opt = ll.optim.sgd(0.1)
    base = ll.train_step(model, mse_with_mae, opt)
    step = ll.accumulate(2)(base)
    micro = regression_batches([4, 12], seed=7)
    start = ll.init(model, opt, seed=1)
    with torch.no_grad():
        parts = [mse_with_mae(model, b) for b in micro]
    (l1, m1), (l2, m2) = parts

    opened = ll.fold(step, start, micro[:1]) if driver == "fold" else step(start, micro[0])
    assert int(opened.step) == 0
    assert float(opened.metrics["weight"]) == 4
    torch.testing.assert_close(opened.metrics["loss"], l1, rtol=1e-12, atol=0)
    torch.testing.assert_close(opened.metrics["mae"], m1["mae"], rtol=1e-12, atol=0)

    closed = ll.fold(step, start, micro) if driver == "fold" else step(opened, micro[1])
    assert int(closed.step) == 1
    assert float(closed.metrics["weight"]) == 16
    torch.testing.assert_close(closed.metrics["loss"], (4 * l1 + 12 * l2) / 16, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        closed.metrics["mae"], (4 * m1["mae"] + 12 * m2["mae"]) / 16, rtol=1e-12, atol=0
    )
    # And not the plain mean of the two micro-batches, nor the last one's.
    assert not torch.allclose(closed.metrics["loss"], (l1 + l2) / 2)
    assert not torch.allclose(closed.metrics["loss"], l2)
    # The slot holds the window's sums while it is open, and zeros once it closed.
    torch.testing.assert_close(
        opened.slots["accumulate"].metrics["loss"], 4 * l1, rtol=1e-12, atol=0
    )
    assert all(not m.any() for m in closed.slots["accumulate"].metrics.values())


def _dropout_chain(k: int):
    model = mlp(seed=4, dropout=0.3, batchnorm=True)
    opt = ll.optim.adam(0.05)
    step = ll.chain(ll.accumulate(k), ll.track_norm(2), ll.clip(0.5))(
        ll.train_step(model, mse, opt)
    )
    return model, opt, step


@given(
    k=st.integers(2, 4),
    sizes=st.lists(st.integers(2, 5), min_size=1, max_size=10),
    seed=st.integers(0, 2**16),
)
def test_fold_equals_running_the_windows_of_step_groups(k: int, sizes: list[int], seed: int):
    """fold hands the step whole windows: ``step.run`` over ``step.groups`` (an open window at
    the end stays open), bit for bit, dropout included."""
    model, opt, step = _dropout_chain(k)
    batches = regression_batches(sizes, seed=seed)
    start = ll.init(model, opt, seed=seed)
    got = ll.fold(step, start, batches)

    want = step.init(start, batches[0])
    groups = list(step.groups(batches, 0))
    assert [len(g) for g, _ in groups] == [k] * (len(sizes) // k) + (
        [len(sizes) % k] if len(sizes) % k else []
    )
    assert all(first == 0 for _, first in groups)
    for group, first in groups:
        want = step.run(want, group, first)
    assert_trees_equal(got, want)
    assert int(got.step) == len(sizes) // k
    assert int(got.slots["accumulate"].count) == len(sizes) % k


@given(
    k=st.integers(2, 4),
    sizes=st.lists(st.integers(2, 5), min_size=1, max_size=10),
    seed=st.integers(0, 2**16),
)
def test_lone_calls_equal_fold_bit_for_bit(k: int, sizes: list[int], seed: int) -> None:
    """A lone ``step(state, batch)`` closes the window by a tensor select, fold by a Python
    fact: the same states, bit for bit (params, optimizer state, slots, metrics, key)."""
    model, opt, step = _dropout_chain(k)
    batches = regression_batches(sizes, seed=seed)
    start = ll.init(model, opt, seed=seed)
    folded = ll.fold(step, start, batches)
    state = start
    for batch in batches:
        state = step(state, batch)
    assert_trees_equal(state, folded)
    # And after flushing a partial window.
    assert_trees_equal(step.flush(state), step.flush(folded))


def test_a_fold_may_start_inside_a_window() -> None:
    """A state whose window is open (from a lone call) folds on from its position."""
    model, opt, step = _dropout_chain(3)
    batches = regression_batches([2, 3, 4, 5, 2, 2, 3], seed=9)
    start = ll.init(model, opt, seed=0)
    whole = ll.fold(step, start, batches)
    opened = step(start, batches[0])
    assert step.position(opened) == 1
    assert [first for _, first in step.groups(batches[1:], 1)] == [1, 0, 0]
    assert_trees_equal(ll.fold(step, opened, batches[1:]), whole)


# --------------------------------------------------------------------------- partial windows


@given(k=st.integers(2, 5), data=st.data(), seed=st.integers(0, 2**16))
def test_flush_step_applies_the_mean_over_the_samples_seen(k: int, data, seed: int) -> None:
    r = data.draw(st.integers(1, k - 1), label="micro-batches in the partial window")
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=r, max_size=r), label="sizes")
    model = mlp(seed=2)
    opt = ll.optim.adam(0.05)
    base = ll.train_step(model, mse, opt)
    step = ll.accumulate(k)(base)
    micro = regression_batches(sizes, seed=seed)
    held = ll.fold(step, ll.init(model, opt), micro)
    assert int(held.step) == 0

    snap_state = held
    flushed = step.flush(held)
    assert_trees_equal(held, snap_state)
    one = base(ll.init(model, opt), concat(micro))
    assert int(flushed.step) == 1
    assert_trees_close(flushed.params, one.params)
    assert_trees_close(flushed.opt_state, one.opt_state)
    assert int(flushed.slots["accumulate"].count) == 0
    assert float(flushed.slots["accumulate"].weight) == 0
    assert_same_structure(flushed, held)


def test_flush_drop_discards_the_partial_window() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1, momentum=0.9)
    step = ll.accumulate(3, partial="drop")(ll.train_step(model, mse, opt))
    state = ll.fold(step, ll.init(model, opt), regression_batches([4, 4, 4, 4, 4]))
    assert int(state.step) == 1 and int(state.slots["accumulate"].count) == 2
    flushed = step.flush(state)
    assert_trees_equal(flushed.params, state.params)
    assert_trees_equal(flushed.opt_state, state.opt_state)
    assert int(flushed.step) == 1
    assert int(flushed.slots["accumulate"].count) == 0
    assert float(flushed.slots["accumulate"].weight) == 0
    assert all(not g.any() for g in flushed.slots["accumulate"].grads.values())
    assert_same_structure(flushed, state)


def test_flush_carry_keeps_the_window_open_into_the_next_epoch() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1, momentum=0.9)
    base = ll.train_step(model, mse, opt)
    step = ll.accumulate(3, partial="carry")(base)
    epoch1 = regression_batches([2, 3, 4, 5], seed=0)  # one window and one micro-batch
    epoch2 = regression_batches([6, 1], seed=10)  # completes the carried window
    state = ll.fold(step, ll.init(model, opt), epoch1)
    flushed = step.flush(state)
    assert_trees_equal(flushed, state)
    state = ll.fold(step, flushed, epoch2)
    want = ll.fold(base, ll.init(model, opt), [concat(epoch1[:3]), concat([epoch1[3], *epoch2])])
    assert int(state.step) == 2 and int(state.slots["accumulate"].count) == 0
    assert_trees_close(state.params, want.params)


@pytest.mark.parametrize("partial", ["step", "drop", "carry"])
def test_flush_of_an_empty_window_changes_nothing(partial: str) -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)
    step = ll.accumulate(2, partial=partial)(ll.train_step(model, mse, opt))
    state = ll.fold(step, ll.init(model, opt), regression_batches([3, 3]))
    assert int(state.slots["accumulate"].count) == 0
    assert_trees_equal(step.flush(state), state)
    fresh = ll.init(model, opt)
    # A state without the slot has nothing to flush: the identity.
    assert_trees_equal(step.flush(fresh), fresh)
    ready = step.init(fresh, regression_batch(3))
    assert_trees_equal(step.flush(ready), ready)


def test_flush_without_accumulate_changes_nothing() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)
    step = ll.chain(ll.track_norm(2), ll.clip(1.0))(ll.train_step(model, mse, opt))
    state = step(ll.init(model, opt), regression_batch(4))
    assert_trees_equal(step.flush(state), state)


def test_flush_runs_the_stages_after_accumulate() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)
    step = ll.chain(ll.accumulate(4), ll.track_norm(2), ll.clip(1e-3))(
        ll.train_step(model, mse, opt)
    )
    micro = regression_batches([3, 2])
    state = ll.fold(step, ll.init(model, opt), micro)
    assert torch.isnan(state.metrics["grad_2.0_norm_total"])
    flushed = step.flush(state)
    ref = copy.deepcopy(model)
    mse(ref, concat(micro)).backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-3)
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    torch.testing.assert_close(flushed.metrics["grad_2.0_norm_total"], norm)
    assert_params_close(flushed, ref)


# --------------------------------------------------------------------------- weights


def _padded_batch(lengths: list[int], t: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), t, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(len(lengths), t, generator=gen, dtype=torch.float64)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return x * mask[..., None], y * mask, mask


def _pad_to(batch, t: int):
    x, y, mask = batch
    extra = t - x.shape[1]
    return (
        torch.nn.functional.pad(x, (0, 0, 0, extra)),
        torch.nn.functional.pad(y, (0, extra)),
        torch.nn.functional.pad(mask, (0, extra)),
    )


def token_mean_loss(model: nn.Module, batch) -> ll.LossOutput:
    """The mean squared error over the non-padding tokens, weighted by their number."""
    x, y, mask = batch
    pred = model(x).squeeze(-1)
    n = mask.sum()
    return ll.LossOutput(((pred - y) ** 2 * mask).sum() / n, weight=n)


@given(
    shapes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 6)), min_size=2, max_size=4),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_token_weights_make_accumulation_a_token_mean(shapes, data, seed: int) -> None:
    micro = []
    for i, (b, t) in enumerate(shapes):
        lengths = data.draw(st.lists(st.integers(1, t), min_size=b, max_size=b))
        micro.append(_padded_batch(lengths, t, seed + i))
    t_max = max(t for _, t in shapes)
    whole = concat([_pad_to(m, t_max) for m in micro])

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    opt = ll.optim.sgd(0.5)
    step = ll.train_step(model, token_mean_loss, opt)
    one = step(ll.init(model, opt), whole)
    acc = ll.fold(ll.accumulate(len(micro))(step), ll.init(model, opt), micro)
    # The window's weight is its total number of tokens.
    assert float(acc.metrics["weight"]) == sum(int(m[2].sum()) for m in micro)
    assert_trees_close(acc.params, one.params)


def test_sample_weights_are_not_a_token_mean() -> None:
    """Why the weight matters: with one sample of 1 token and one of 6, weighting the two
    micro-batches by their sample counts gives a different update than the token mean."""
    micro = [_padded_batch([1], 1, 0), _padded_batch([6], 6, 1)]
    whole = concat([_pad_to(m, 6) for m in micro])

    def sample_weighted(model, batch):
        return token_mean_loss(model, batch).loss

    model = nn.Sequential(nn.Linear(3, 1)).double()
    opt = ll.optim.sgd(0.5)
    one = ll.train_step(model, token_mean_loss, opt)(ll.init(model, opt), whole)
    acc = ll.fold(
        ll.accumulate(2)(ll.train_step(model, sample_weighted, opt)), ll.init(model, opt), micro
    )
    assert not torch.allclose(acc.params["0.weight"], one.params["0.weight"])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"k": 0}, ValueError, "accumulate(k=0): k must be a positive int, got 0."),
        ({"k": -3}, ValueError, "accumulate(k=-3): k must be a positive int, got -3."),
        ({"k": 2.0}, TypeError, "accumulate(k=2.0): k must be a positive int, got 2.0."),
        ({"k": True}, TypeError, "accumulate(k=True): k must be a positive int, got True."),
        ({"k": "4"}, TypeError, "accumulate(k='4'): k must be a positive int, got '4'."),
        ({"k": None}, TypeError, "accumulate(k=None): k must be a positive int, got None."),
        (
            {"k": 2, "partial": "last"},
            ValueError,
            "accumulate(partial='last'): partial must be one of ['step', 'drop', 'carry'], "
            "got 'last'.",
        ),
        (
            {"k": 2, "partial": None},
            ValueError,
            "accumulate(partial=None): partial must be one of ['step', 'drop', 'carry'], got None.",
        ),
    ],
)
def test_accumulate_rejects_bad_arguments(kwargs, exc, message: str) -> None:
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        ll.accumulate(**kwargs)


@pytest.mark.parametrize(("first", "second"), [(2, 3), (1, 4), (3, 1), (1, 1)])
def test_accumulate_twice_raises(first: int, second: int) -> None:
    step = ll.train_step(mlp(), mse, ll.optim.sgd(0.1))
    inner = f"accumulate({second})"
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            f"accumulate({first})(step=chain({inner})(train_step(Sequential, mse))): step must "
            "not already contain a transformer owning the slot 'accumulate', got "
            f"chain({inner})(train_step(Sequential, mse)). Use each stateful transformer at "
            "most once per chain."
        )
        + "$",
    ):
        ll.chain(ll.accumulate(first), ll.accumulate(second))(step)


def test_accumulate_applies_only_to_a_step() -> None:
    with pytest.raises(
        TypeError,
        match=r"^accumulate\(2\)\(step=<function mse .*>\): step must be a looplib Step \(from "
        r"ll.train_step or another transformer\), got <function mse",
    ):
        ll.accumulate(2)(mse)


def test_repr() -> None:
    assert repr(ll.accumulate(4)) == "accumulate(4)"
    assert repr(ll.accumulate(4, partial="carry")) == "accumulate(4, partial='carry')"


def test_a_window_of_zero_weight_gives_a_zero_gradient_not_nan() -> None:
    model = torch.nn.Linear(3, 2)
    opt = ll.optim.sgd(0.1)

    def weightless(m: torch.nn.Module, batch: torch.Tensor) -> ll.LossOutput:
        return ll.LossOutput(m(batch).pow(2).mean(), weight=0.0)

    step = ll.accumulate(2)(ll.train_step(model, weightless, opt))
    state = ll.init(model, opt)
    after = ll.fold(step, state, [torch.ones(4, 3), torch.ones(4, 3)])
    assert int(after.step) == 1
    for key in state.params:
        assert torch.equal(after.params[key], state.params[key])
