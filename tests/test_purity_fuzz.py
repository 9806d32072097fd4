"""Purity under fuzzing: random valid chains over random small models never change their input.

Hypothesis draws a model (an MLP of random widths and dtype, with or without BatchNorm1d in train
mode and Dropout, or a recurrent model for truncated BPTT), a valid chain (an optional
``tbptt_split`` first, then any subset, in any order, of ``accumulate``, ``track_norm``, ``clip``
and ``skip_nonfinite``), an optimizer and a run of batches, some of them poisoned with NaN
when the chain skips them. Along the whole run, ``step.init``, every call, ``fold`` and
``flush``:

* leave every tensor of the input state and of the batch as it was, in value and in
  ``_version`` (no write in place, not even one undone later);
* return a state of the treespec, shapes and dtypes that ``step.init(state, batch)`` gave;
* leave the template module's parameters and buffers (the same tensor objects, same values)
  and torch's global generator alone (every state carries its own key);
* and do all that too when they raise (``step.check``, ``fold``, a failing loss).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import looplib as ll
from tests.helpers import assert_same_structure, assert_snapshot_unchanged, snapshot


class Mlp(nn.Module):
    def __init__(self, widths: list[int], batchnorm: bool, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths[:-1]):
            layers.append(nn.Linear(a, b))
            if batchnorm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.Tanh())
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(widths[-2], widths[-1]))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Rnn(nn.Module):
    def __init__(self, features: int, hidden: int, cell: str, dropout: float) -> None:
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(features, hidden, batch_first=True)
        self.norm = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, carry: Any) -> tuple[torch.Tensor, Any]:
        out, carry = self.rnn(x, carry)
        b, t, h = out.shape
        out = self.drop(self.norm(out.reshape(b * t, h))).reshape(b, t, h)
        return self.head(out).squeeze(-1), carry


def mlp_loss(model: nn.Module, batch: Any) -> Any:
    x, y = batch
    pred = model(x)
    return F.mse_loss(pred, y), {"mae": (pred - y).abs().mean()}


def rnn_loss(model: nn.Module, batch: Any, carry: Any = None) -> Any:
    x, y = batch
    pred, carry = model(x, carry)
    return F.mse_loss(pred, y), {}, carry


@st.composite
def setups(draw: st.DrawFn) -> dict[str, Any]:
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    dropout = draw(st.sampled_from([0.0, 0.5]))
    torch.manual_seed(draw(st.integers(0, 1000)))
    recurrent = draw(st.booleans())
    if recurrent:
        features = draw(st.integers(1, 3))
        model: nn.Module = Rnn(
            features, draw(st.integers(1, 4)), draw(st.sampled_from(["lstm", "gru"])), dropout
        )
        loss = rnn_loss
    else:
        widths = draw(st.lists(st.integers(1, 5), min_size=2, max_size=4))
        features = widths[0]
        model = Mlp([*widths, 1], draw(st.booleans()), dropout)
        loss = mlp_loss
    model = model.to(dtype)

    parts: list[ll.Transformer] = []
    if recurrent and draw(st.booleans()):
        parts.append(ll.tbptt_split(draw(st.integers(1, 4))))
    options = {
        "accumulate": lambda: ll.accumulate(
            draw(st.integers(1, 3)), partial=draw(st.sampled_from(["step", "drop", "carry"]))
        ),
        "track_norm": lambda: ll.track_norm(
            draw(st.sampled_from([1, 2, "inf", 0.5])), per_param=draw(st.booleans())
        ),
        "clip": lambda: ll.clip(
            draw(st.sampled_from([1e-3, 1.0, math.inf])), draw(st.sampled_from([1, 2, "inf"]))
        ),
        "skip_nonfinite": lambda: ll.skip_nonfinite(draw(st.integers(1, 3))),
    }
    names = draw(st.permutations(sorted(options)))[: draw(st.integers(0, len(options)))]
    parts += [options[name]() for name in names]

    opt = draw(
        st.sampled_from(
            [
                ll.optim.sgd(0.1),
                ll.optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                ll.optim.adam(1e-2),
                ll.optim.adamw(1e-2),
            ]
        )
    )
    step = ll.train_step(model, loss, opt)
    if parts:
        step = ll.chain(*parts)(step)

    n = draw(st.integers(1, 6))
    poison = set()
    if "skip_nonfinite" in names:  # at most one bad batch in a row, under every skip limit
        poison = {i for i in range(0, n, 2) if draw(st.booleans())}
    batches = []
    for i in range(n):
        b = draw(st.integers(2, 4))  # BatchNorm in train mode needs 2 samples
        if recurrent:
            t = draw(st.integers(1, 5))
            x, y = torch.randn(b, t, features, dtype=dtype), torch.randn(b, t, dtype=dtype)
        else:
            x, y = torch.randn(b, features, dtype=dtype), torch.randn(b, 1, dtype=dtype)
        if i in poison:
            y[0, -1] = math.nan
        batches.append((x, y))
    seed = draw(st.one_of(st.none(), st.integers(0, 2**31)))
    return {
        "model": model,
        "step": step,
        "state": ll.init(model, opt, seed=seed),
        "batches": batches,
    }


def module_snapshot(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The module's own tensors: the objects themselves and clones of their values."""
    return [(name, t, t.detach().clone()) for name, t in model.state_dict(keep_vars=True).items()]


def assert_module_unchanged(model: nn.Module, snap: list[tuple[str, Any, Any]]) -> None:
    now = model.state_dict(keep_vars=True)
    assert list(now) == [name for name, _, _ in snap]
    for name, tensor, value in snap:
        assert now[name] is tensor, f"module.{name} was replaced"
        assert torch.equal(tensor.detach(), value), f"module.{name} changed"


def checked_call(fn: Any, model: nn.Module, state: ll.TrainState, *args: Any) -> Any:
    """Call ``fn(state, *args)`` and check every purity law, whether it returns or raises."""
    snap, batch_snap = snapshot(state), snapshot(args)
    module = module_snapshot(model)
    rng = torch.get_rng_state()
    try:
        out = fn(state, *args)
    finally:
        assert_snapshot_unchanged(snap)
        assert_snapshot_unchanged(batch_snap)
        assert_module_unchanged(model, module)
        assert torch.equal(torch.get_rng_state(), rng), "the global generator moved"
    return out


@given(setups())
def test_random_chains_never_change_their_input(setup: dict[str, Any]) -> None:
    model, step, start = setup["model"], setup["step"], setup["state"]
    batches = setup["batches"]
    reference = checked_call(step.init, model, start, batches[0])
    state = start
    for batch in batches:
        new = checked_call(step, model, state, batch)
        assert_same_structure(new, reference)
        state = new
    # fold: pure on the caller's state although it donates the states it makes. (Its values
    # against the calls are the laws of test_contract and test_skip.)
    folded = checked_call(lambda s, bs: ll.fold(step, s, bs), model, start, batches)
    assert_same_structure(folded, reference)
    flushed = checked_call(step.flush, model, state)
    assert_same_structure(flushed, reference)
    checked_call(step.check, model, flushed)
    # A state the step returned is an input like any other: running on it again is pure too.
    again = checked_call(step, model, flushed, batches[0])
    assert_same_structure(again, reference)


@given(st.integers(0, 2), st.booleans())
def test_a_call_that_raises_leaves_everything_as_it_was(limit: int, seeded: bool) -> None:
    torch.manual_seed(limit)
    model = Mlp([3, 4, 1], batchnorm=True, dropout=0.5)
    opt = ll.optim.adam(1e-2)
    step = ll.chain(ll.skip_nonfinite(limit), ll.clip(1.0))(ll.train_step(model, mlp_loss, opt))
    start = ll.init(model, opt, seed=7 if seeded else None)
    bad = (torch.randn(3, 3), torch.full((3, 1), math.nan))
    state = start
    for _ in range(limit + 1):  # the step itself never raises
        state = checked_call(step, model, state, bad)
    with pytest.raises(ll.NonFiniteGradientError):
        checked_call(step.check, model, state)
    with pytest.raises(ll.NonFiniteGradientError):
        checked_call(lambda s, bs: ll.fold(step, s, bs), model, start, [bad] * (limit + 1))

    def failing_loss(m: nn.Module, batch: Any) -> Any:
        m(batch[0])  # runs the module, BatchNorm included, then fails
        raise RuntimeError("boom")

    broken = ll.train_step(model, failing_loss, opt)
    with pytest.raises(RuntimeError, match=r"^boom$"):
        checked_call(broken, model, ll.init(model, opt, seed=1 if seeded else None), bad)
    # Failing after the structure is known: in the gradient pass, not the init's probe.
    calls = []

    def fails_second(m: nn.Module, batch: Any) -> Any:
        calls.append(1)
        if len(calls) > 1:
            m(batch[0])
            raise RuntimeError("boom")
        return mlp_loss(m, batch)

    late = ll.train_step(model, fails_second, opt)
    ready = late.init(ll.init(model, opt, seed=2), bad)
    with pytest.raises(RuntimeError, match=r"^boom$"):
        checked_call(late, model, ready, bad)
