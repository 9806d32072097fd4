"""``tbptt_split`` and ``split_time``: an imperative TBPTT loop with an LSTM as the oracle, the
chunking laws (nothing lost, ``ceil(T / k)`` chunks of at most ``k`` steps), and the order
rules of a chain."""

from __future__ import annotations

import copy
import math
import re
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import looplib as ll
from tests.helpers import (
    assert_params_close,
    assert_pure,
    assert_trees_equal,
    mlp,
    mse,
    sequence_batch,
    sequence_loss,
    sequence_model,
)

# --------------------------------------------------------------------------- split_time laws


@given(
    b=st.integers(1, 4),
    t=st.integers(1, 20),
    f=st.integers(1, 3),
    k=st.integers(1, 8),
)
def test_split_time_of_tensors_concatenates_back(b: int, t: int, f: int, k: int) -> None:
    x = torch.randn(b, t, f)
    y = torch.randn(b, t)
    labels = torch.arange(b)
    chunks = ll.split_time((x, y, labels), k)
    assert len(chunks) == math.ceil(t / k)
    for cx, cy, cl in chunks:
        assert 1 <= cx.shape[1] <= k and cx.shape[1] == cy.shape[1]
        assert cl is labels  # no time axis: passed unchanged to every chunk
    assert torch.equal(torch.cat([c[0] for c in chunks], dim=1), x)
    assert torch.equal(torch.cat([c[1] for c in chunks], dim=1), y)


@given(
    lengths=st.lists(st.integers(1, 15), min_size=1, max_size=6),
    k=st.integers(1, 7),
    f=st.integers(1, 3),
)
def test_split_time_of_variable_length_sequences_loses_nothing(
    lengths: list[int], k: int, f: int
) -> None:
    seqs = [torch.randn(n, f) for n in lengths]
    targets = [torch.randn(n) for n in lengths]
    chunks = ll.split_time((seqs, targets), k)
    assert len(chunks) == math.ceil(max(lengths) / k)
    for cs, ct in chunks:
        assert isinstance(cs, list) and len(cs) == len(seqs)
        assert all(len(s) <= k and len(s) == len(u) for s, u in zip(cs, ct, strict=True))
    for i, (s, u) in enumerate(zip(seqs, targets, strict=True)):
        assert torch.equal(torch.cat([c[0][i] for c in chunks]), s)
        assert torch.equal(torch.cat([c[1][i] for c in chunks]), u)
    assert sum(len(s) for c in chunks for s in c[0]) == sum(lengths)


class Batch(NamedTuple):
    x: torch.Tensor
    mask: torch.Tensor
    extra: dict


def test_split_time_walks_dicts_named_tuples_and_mixed_batches() -> None:
    x = torch.arange(2 * 5).reshape(2, 5)
    batch = Batch(x, x > 3, {"seqs": [torch.arange(7), torch.arange(2)], "id": "abc", "n": 3})
    chunks = ll.split_time(batch, 3)
    assert len(chunks) == 3  # the longest time axis (7) decides
    assert all(isinstance(c, Batch) for c in chunks)
    assert [c.x.shape[1] for c in chunks] == [3, 2, 0]
    assert [[len(s) for s in c.extra["seqs"]] for c in chunks] == [[3, 2], [3, 0], [1, 0]]
    assert all(c.extra["id"] == "abc" and c.extra["n"] == 3 for c in chunks)
    assert torch.equal(torch.cat([c.x for c in chunks], dim=1), x)


def test_split_time_treats_a_top_level_list_as_a_container() -> None:
    x, y = torch.zeros(3, 5, 2), torch.zeros(3, 5)
    chunks = ll.split_time([x, y], 2)
    assert [type(c) for c in chunks] == [list] * 3
    assert [c[0].shape[1] for c in chunks] == [2, 2, 1]


def test_split_time_of_a_batch_without_time_axis_is_empty() -> None:
    assert ll.split_time((torch.zeros(4), 3), 2) == []


# --------------------------------------------------------------------------- the LSTM oracle


class LSTMRegressor(nn.Module):
    def __init__(self, features: int = 3, hidden: int = 5) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x, hc=None):
        out, hc = self.lstm(x, hc)
        return self.head(out).squeeze(-1), hc


def lstm_loss(model: nn.Module, batch, carry):
    x, y = batch
    pred, hc = model(x, carry)
    return F.mse_loss(pred, y), {"mae": (pred - y).abs().mean()}, hc


def imperative_tbptt(model, batches, k: int, lr: float, accumulate: int = 1):
    """The classic loop: the hidden state starts at zero for every batch, is detached between
    chunks, and one optimizer step follows every ``accumulate`` chunks (counted across batches;
    each chunk weighted by its sample count, all equal here)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    seen = 0
    for x, y in batches:
        hc = None
        for t in range(0, x.shape[1], k):
            pred, hc = model(x[:, t : t + k], hc)
            (F.mse_loss(pred, y[:, t : t + k]) / accumulate).backward()
            hc = tuple(h.detach() for h in hc)
            seen += 1
            if seen % accumulate == 0:
                opt.step()
                opt.zero_grad()
    return seen


def lstm_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = LSTMRegressor().double()
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [
        (
            torch.randn(3, 7, 3, generator=gen, dtype=torch.float64),
            torch.randn(3, 7, generator=gen, dtype=torch.float64),
        )
        for _ in range(4)
    ]
    return model, batches


@pytest.mark.parametrize("k", [1, 3, 7, 10])
def test_tbptt_matches_the_imperative_loop(k: int) -> None:
    model, batches = lstm_setup()
    ref = copy.deepcopy(model)
    opt = ll.optim.sgd(0.1, momentum=0.9)
    step = ll.tbptt_split(k)(ll.train_step(model, lstm_loss, opt))
    state = ll.fold(step, ll.init(model, opt), batches)
    chunks = imperative_tbptt(ref, batches, k, 0.1)
    assert int(state.step) == chunks == 4 * math.ceil(7 / k)
    assert_params_close(state, ref)


@pytest.mark.parametrize(("k", "acc"), [(3, 2), (3, 4), (2, 3)])
def test_tbptt_with_accumulate_across_chunks_matches_the_imperative_loop(k: int, acc: int) -> None:
    model, batches = lstm_setup(seed=3)
    ref = copy.deepcopy(model)
    opt = ll.optim.sgd(0.1, momentum=0.9)
    step = ll.chain(ll.tbptt_split(k), ll.accumulate(acc))(ll.train_step(model, lstm_loss, opt))
    state = ll.fold(step, ll.init(model, opt), batches)
    chunks = imperative_tbptt(ref, batches, k, 0.1, accumulate=acc)
    assert int(state.step) == chunks // acc
    assert int(state.slots["accumulate"].count) == chunks % acc
    assert_params_close(state, ref)


def _chunk_metrics(model, x, y, k: int):
    """Each chunk's loss and mae at the model's params, the carry threaded through."""
    losses, maes, hc = [], [], None
    with torch.no_grad():
        for t in range(0, x.shape[1], k):
            pred, hc = model(x[:, t : t + k], hc)
            losses.append(F.mse_loss(pred, y[:, t : t + k]))
            maes.append((pred - y[:, t : t + k]).abs().mean())
    return losses, maes


def test_without_accumulate_the_metrics_are_the_last_chunks() -> None:
    """Each chunk is an update, and ``state.metrics`` describe the last update."""
    model, batches = lstm_setup()
    x, y = batches[0]
    opt = ll.optim.sgd(0.0)  # lr 0: every chunk sees the initial params
    state = ll.tbptt_split(3)(ll.train_step(model, lstm_loss, opt))(ll.init(model, opt), (x, y))
    losses, maes = _chunk_metrics(model, x, y, 3)
    assert int(state.step) == len(losses) == 3
    torch.testing.assert_close(state.metrics["loss"], losses[-1])
    torch.testing.assert_close(state.metrics["mae"], maes[-1])
    assert float(state.metrics["weight"]) == 3  # the last chunk's samples
    assert not torch.allclose(state.metrics["loss"], torch.stack(losses).mean())


def test_with_accumulate_over_the_chunks_the_metrics_are_their_weighted_mean() -> None:
    model, batches = lstm_setup()
    x, y = batches[0]
    opt = ll.optim.sgd(0.0)
    step = ll.chain(ll.tbptt_split(3), ll.accumulate(3))(ll.train_step(model, lstm_loss, opt))
    state = step(ll.init(model, opt), (x, y))
    losses, maes = _chunk_metrics(model, x, y, 3)
    assert int(state.step) == 1
    torch.testing.assert_close(state.metrics["loss"], torch.stack(losses).mean())
    torch.testing.assert_close(state.metrics["mae"], torch.stack(maes).mean())
    assert float(state.metrics["weight"]) == 3 * 3


@pytest.mark.parametrize("acc", [1, 2, 3])
def test_scan_records_one_entry_per_batch(acc: int) -> None:
    """Under tbptt_split a batch is one call of the step's run, however many chunks (and
    updates) it holds; each entry is the per-call loop's metrics after that batch."""
    model, batches = lstm_setup(seed=2)
    opt = ll.optim.sgd(0.1, momentum=0.9)
    step = ll.chain(ll.tbptt_split(3), ll.accumulate(acc))(ll.train_step(model, lstm_loss, opt))
    start = ll.init(model, opt)
    state, metrics = ll.scan(step, start, batches)
    assert len(metrics) == len(batches)
    manual = start
    for batch, m in zip(batches, metrics, strict=True):
        manual = step(manual, batch)
        assert_trees_equal(m, manual.metrics)
    assert_trees_equal(state, manual)
    assert int(state.step) == (len(batches) * 3) // acc


def test_the_carry_starts_as_none_at_every_batch_and_arrives_detached() -> None:
    carries = []

    def loss_fn(model, batch, carry):
        carries.append(carry)
        loss, metrics, _ = sequence_loss(model, batch)
        out = model.out.weight.sum() * 0 + (0 if carry is None else carry)
        return loss, metrics, out + 1

    model = sequence_model()
    opt = ll.optim.sgd(0.1)
    step = ll.tbptt_split(2)(ll.train_step(model, loss_fn, opt))
    batches = [sequence_batch(t=5), sequence_batch(t=3)]
    # step.init learns the metrics from one forward pass on the first chunk, carry None.
    state = step.init(ll.init(model, opt), batches[0])
    assert carries == [None]
    carries.clear()
    ll.fold(step, state, batches)
    assert [c if c is None else float(c) for c in carries] == [None, 1, 2, None, 1]
    assert all(c is None or not c.requires_grad for c in carries)


def test_a_custom_split() -> None:
    def halves(batch, steps):
        x, y = batch
        return [(x[:, :steps], y[:, :steps]), (x[:, steps:], y[:, steps:])]

    model = sequence_model()
    opt = ll.optim.sgd(0.1)
    step = ll.tbptt_split(2, split=halves)(ll.train_step(model, sequence_loss, opt))
    assert repr(step).startswith("chain(tbptt_split(2, split=halves))")
    state = step(ll.init(model, opt), sequence_batch(t=7))
    assert int(state.step) == 2


def test_tbptt_is_pure() -> None:
    model = sequence_model()
    opt = ll.optim.adam(0.1)
    step = ll.chain(ll.tbptt_split(2), ll.accumulate(2), ll.clip(0.1))(
        ll.train_step(model, sequence_loss, opt)
    )
    state = ll.init(model, opt)
    for seed in range(3):
        state = assert_pure(step, state, sequence_batch(t=5, seed=seed))


def test_tbptt_split_with_one_chunk_equals_the_plain_step() -> None:
    model = sequence_model()
    opt = ll.optim.sgd(0.1)
    base = ll.train_step(model, sequence_loss, opt)
    batch = sequence_batch(t=4)
    want = base(ll.init(model, opt, seed=1), batch)  # the model has dropout: the same key
    got = ll.tbptt_split(4)(base)(ll.init(model, opt, seed=1), batch)
    assert_trees_equal(got, want)


# --------------------------------------------------------------------------- order and errors


def _step():
    return ll.train_step(mlp(), mse, ll.optim.sgd(0.1))


def test_accumulate_outside_tbptt_raises_at_construction() -> None:
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "accumulate(2)(step=chain(tbptt_split(4))(train_step(Sequential, mse))): step must "
            "not already be split into chunks by tbptt_split(4): a gradient transformer outside "
            "a batch splitter has no single meaning, got "
            "chain(tbptt_split(4))(train_step(Sequential, mse)). Put tbptt_split(4) first: "
            "chain(tbptt_split(4), accumulate(2), ...)."
        )
        + "$",
    ):
        ll.chain(ll.accumulate(2), ll.tbptt_split(4))(_step())


@pytest.mark.parametrize("outer", [ll.clip(1.0), ll.track_norm(2), ll.accumulate(1)])
def test_any_gradient_transformer_outside_tbptt_raises(outer) -> None:
    with pytest.raises(
        ValueError,
        match=rf"^{re.escape(repr(outer))}\(step=.*must not already be split into chunks by "
        r"tbptt_split\(3\)",
    ):
        ll.chain(outer, ll.tbptt_split(3))(_step())
    with pytest.raises(ValueError, match="must not already be split into chunks"):
        outer(ll.tbptt_split(3)(_step()))


def test_tbptt_twice_raises() -> None:
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "tbptt_split(2)(step=chain(tbptt_split(3))(train_step(Sequential, mse))): step must "
            "not already be split by tbptt_split(3), got "
            "chain(tbptt_split(3))(train_step(Sequential, mse)). Use one batch splitter per chain."
        )
        + "$",
    ):
        ll.chain(ll.tbptt_split(2), ll.tbptt_split(3))(_step())


@pytest.mark.parametrize(
    ("args", "exc", "message"),
    [
        ((0,), ValueError, "tbptt_split(steps=0): steps must be a positive int, got 0."),
        ((-2,), ValueError, "tbptt_split(steps=-2): steps must be a positive int, got -2."),
        ((2.5,), TypeError, "tbptt_split(steps=2.5): steps must be a positive int, got 2.5."),
        ((True,), TypeError, "tbptt_split(steps=True): steps must be a positive int, got True."),
        (
            (4, "time"),
            TypeError,
            "tbptt_split(split='time'): split must be a function (batch, steps) -> list of "
            "chunks, got 'time'.",
        ),
    ],
)
def test_tbptt_split_rejects_bad_arguments(args, exc, message: str) -> None:
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        ll.tbptt_split(*args)


def test_a_batch_without_time_axis_raises_when_split() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)
    step = ll.tbptt_split(2)(ll.train_step(model, lambda m, b, c: mse(m, b), opt))
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "tbptt_split(split=[]): split must return a non-empty list of chunks (a batch "
            "without a time axis?), got []."
        )
        + "$",
    ):
        step(ll.init(model, opt), (torch.zeros(3), torch.zeros(3)))


def test_repr() -> None:
    assert repr(ll.tbptt_split(16)) == "tbptt_split(16)"
    assert (
        repr(ll.chain(ll.tbptt_split(8), ll.accumulate(2), ll.clip(1.0)))
        == "chain(tbptt_split(8), accumulate(2), clip(1.0))"
    )
