"""Packed sequences under the pure step: lists of variable-length sequences, packed inside the
loss with ``pack_sequence(..., enforce_sorted=False)``, through ``nn.LSTM`` and ``nn.GRU``.

The oracle is an imperative loop running the same loss on the module with ``backward`` and
``torch.optim.SGD``, with its own hand-written time chunking for TBPTT. The loss is the
token mean and returns the token count as its weight, so accumulation is a token mean too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence, pad_sequence

import looplib as ll
from tests.helpers import assert_params_close, assert_pure, assert_trees_close

FEATURES, HIDDEN = 2, 4


class PackedRNN(nn.Module):
    def __init__(self, cell: str) -> None:
        super().__init__()
        kind = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.cell = cell
        self.rnn = kind(FEATURES, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)


def packed_loss(model: PackedRNN, batch, carry=None) -> ll.LossOutput:
    """Token-mean squared error of per-step predictions. Sequences that have already ended in
    this chunk (empty pieces under TBPTT) are left out of the pack; their hidden state is
    carried through unchanged."""
    seqs, targets = batch
    live = [i for i, s in enumerate(seqs) if len(s) > 0]
    index = torch.tensor(live)
    zeros = seqs[0].new_zeros(1, len(seqs), HIDDEN)
    lstm = model.cell == "lstm"
    if carry is None:
        carry = (zeros, zeros) if lstm else zeros
    hx = tuple(c[:, index] for c in carry) if lstm else carry[:, index]
    packed = pack_sequence([seqs[i] for i in live], enforce_sorted=False)
    out, hn = model.rnn(packed, hx)
    padded, lengths = pad_packed_sequence(out, batch_first=True)
    pred = model.head(padded).squeeze(-1)
    target = pad_sequence([targets[i] for i in live], batch_first=True)
    mask = torch.arange(pred.shape[1])[None, :] < lengths[:, None]
    tokens = mask.sum()
    loss = ((pred - target) ** 2 * mask).sum() / tokens
    if lstm:
        new = tuple(c.index_copy(1, index, h) for c, h in zip(carry, hn, strict=True))
    else:
        new = carry.index_copy(1, index, hn)
    return ll.LossOutput(loss, {"tokens": tokens.double()}, new, weight=tokens)


def make_model(cell: str, seed: int = 0) -> PackedRNN:
    torch.manual_seed(seed)
    return PackedRNN(cell).double()


def make_batches(lengths: list[list[int]], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for group in lengths:
        seqs = [torch.randn(n, FEATURES, generator=gen, dtype=torch.float64) for n in group]
        targets = [torch.randn(n, generator=gen, dtype=torch.float64) for n in group]
        out.append((seqs, targets))
    return out


def _detach(carry):
    return tuple(c.detach() for c in carry) if isinstance(carry, tuple) else carry.detach()


def imperative(model, batches, lr: float, k: int | None = None, accumulate: int = 1) -> int:
    """The classic loop, with TBPTT chunks cut by hand and token-weighted accumulation:
    ``.grad`` collects ``n_i * grad(mean loss_i)`` and is divided by ``sum(n_i)`` at the step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    seen, tokens = 0, 0
    for seqs, targets in batches:
        longest = max(len(s) for s in seqs)
        width = longest if k is None else k
        carry = None
        for t in range(0, longest, width):
            chunk = ([s[t : t + width] for s in seqs], [y[t : t + width] for y in targets])
            out = packed_loss(model, chunk, carry)
            (out.loss * out.weight).backward()
            tokens += int(out.weight)
            carry = _detach(out.carry)
            seen += 1
            if seen % accumulate == 0:
                for p in model.parameters():
                    p.grad /= tokens
                opt.step()
                opt.zero_grad()
                tokens = 0
    return seen


CELLS = ["lstm", "gru"]
LENGTHS = [[5, 2, 7], [3], [1, 6, 4, 4], [2, 2]]


@pytest.mark.parametrize("cell", CELLS)
def test_packed_step_matches_the_imperative_loop(cell: str) -> None:
    model = make_model(cell)
    ref = copy.deepcopy(model)
    batches = make_batches(LENGTHS)
    opt = ll.optim.sgd(0.2)
    state = ll.fold(ll.train_step(model, packed_loss, opt), ll.init(model, opt), batches)
    assert imperative(ref, batches, 0.2) == int(state.step) == len(batches)
    assert_params_close(state, ref)
    assert float(state.metrics["weight"]) == sum(LENGTHS[-1])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("k", [1, 3, 4])
def test_packed_tbptt_matches_the_imperative_loop(cell: str, k: int) -> None:
    model = make_model(cell, seed=1)
    ref = copy.deepcopy(model)
    batches = make_batches(LENGTHS, seed=1)
    opt = ll.optim.sgd(0.2)
    step = ll.tbptt_split(k)(ll.train_step(model, packed_loss, opt))
    state = ll.fold(step, ll.init(model, opt), batches)
    chunks = imperative(ref, batches, 0.2, k=k)
    assert int(state.step) == chunks == sum(-(-max(g) // k) for g in LENGTHS)
    assert_params_close(state, ref)
    # Each chunk is an update; the metrics are the last one's: its tokens are its weight.
    last = LENGTHS[-1]
    per_chunk = [sum(min(max(n - t, 0), k) for n in last) for t in range(0, max(last), k)]
    assert float(state.metrics["weight"]) == per_chunk[-1]
    assert float(state.metrics["tokens"]) == per_chunk[-1]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("k", [1, 3, 4])
def test_accumulated_chunks_report_token_weighted_metrics(cell: str, k: int) -> None:
    """Accumulating all the chunks of a batch into one update: its metrics are token-weighted
    over the chunks, and the weight is all the batch's tokens."""
    model = make_model(cell, seed=1)
    lengths = LENGTHS[0]
    batch = make_batches([lengths], seed=1)[0]
    per_chunk = [sum(min(max(n - t, 0), k) for n in lengths) for t in range(0, max(lengths), k)]
    opt = ll.optim.sgd(0.2)
    step = ll.chain(ll.tbptt_split(k), ll.accumulate(len(per_chunk)))(
        ll.train_step(model, packed_loss, opt)
    )
    state = step(ll.init(model, opt), batch)
    assert int(state.step) == 1
    assert float(state.metrics["weight"]) == sum(lengths)
    mean_tokens = sum(n * n for n in per_chunk) / sum(per_chunk)
    assert float(state.metrics["tokens"]) == pytest.approx(mean_tokens, rel=1e-12)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(("k", "acc"), [(2, 3), (3, 2)])
def test_packed_tbptt_with_token_weighted_accumulation(cell: str, k: int, acc: int) -> None:
    model = make_model(cell, seed=2)
    ref = copy.deepcopy(model)
    batches = make_batches(LENGTHS, seed=2)
    opt = ll.optim.sgd(0.2)
    step = ll.chain(ll.tbptt_split(k), ll.accumulate(acc))(ll.train_step(model, packed_loss, opt))
    state = ll.fold(step, ll.init(model, opt), batches)
    chunks = imperative(ref, batches, 0.2, k=k, accumulate=acc)
    assert int(state.step) == chunks // acc
    assert_params_close(state, ref)


@pytest.mark.parametrize("cell", CELLS)
@given(
    groups=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=4), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_accumulating_packed_micro_batches_equals_one_step_on_their_concatenation(
    cell: str, groups: list[list[int]], seed: int
) -> None:
    model = make_model(cell, seed=seed % 3)
    opt = ll.optim.sgd(0.3)
    step = ll.train_step(model, packed_loss, opt)
    micro = make_batches(groups, seed=seed)
    whole = ([s for b in micro for s in b[0]], [y for b in micro for y in b[1]])
    one = step(ll.init(model, opt), whole)
    acc = ll.fold(ll.accumulate(len(micro))(step), ll.init(model, opt), micro)
    assert_trees_close(acc.params, one.params)


@pytest.mark.parametrize("cell", CELLS)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_packed_tbptt_for_random_lengths(cell: str, lengths: list[int], k: int, seed: int) -> None:
    model = make_model(cell, seed=seed % 3)
    ref = copy.deepcopy(model)
    batches = make_batches([lengths], seed=seed)
    opt = ll.optim.sgd(0.1)
    state = ll.tbptt_split(k)(ll.train_step(model, packed_loss, opt))(
        ll.init(model, opt), batches[0]
    )
    imperative(ref, batches, 0.1, k=k)
    assert_params_close(state, ref)


@pytest.mark.parametrize("cell", CELLS)
def test_packed_step_is_pure(cell: str) -> None:
    model = make_model(cell)
    opt = ll.optim.adam(0.05)
    step = ll.chain(ll.tbptt_split(2), ll.accumulate(2), ll.track_norm(2), ll.clip(0.5))(
        ll.train_step(model, packed_loss, opt)
    )
    state = ll.init(model, opt)
    for batch in make_batches(LENGTHS, seed=4):
        state = assert_pure(step, state, batch)


def test_default_weight_of_a_list_of_sequences_is_its_length() -> None:
    model = make_model("gru")
    opt = ll.optim.sgd(0.1)

    def loss_fn(m, batch):
        return packed_loss(m, batch).loss

    state = ll.train_step(model, loss_fn, opt)(ll.init(model, opt), make_batches([[3, 1, 2]])[0])
    assert float(state.metrics["weight"]) == 3
