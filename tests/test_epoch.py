"""Tests for ``ll.epoch``: one pass, the epoch's sums in the state, a plain loop's results."""

from __future__ import annotations

import math

import optree
import pytest
import torch
from torch import nn

import looplib as ll
from tests.helpers import assert_trees_equal


def loss_fn(model: nn.Module, batch: tuple) -> tuple:
    err = model(batch[0]).squeeze(-1) - batch[1]
    return err.pow(2).mean(), {"mae": err.abs().mean()}


def setup(k: int = 1):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = ll.optim.adam(0.05)
    step = ll.chain(ll.accumulate(k), ll.track_norm(2, per_param=False))(
        ll.train_step(model, loss_fn, opt)
    )
    batches = [(torch.randn(n, 3), torch.randn(n)) for n in (2, 5, 3, 4, 1)]
    return step, ll.init(model, opt, seed=0), batches


@pytest.mark.parametrize("k", [1, 2, 3])
def test_epoch_equals_the_plain_loop_and_keeps_the_sums(k: int) -> None:
    step, state, batches = setup(k)
    before = optree.tree_map(torch.clone, state)
    out = ll.epoch(step, state, batches)
    assert optree.tree_all(optree.tree_map(torch.equal, state, before))  # input untouched
    s, losses, weights, norms = state, [], [], []
    for batch in batches:
        new = step(s, batch)
        if int(new.step) > int(s.step):
            losses.append(float(new.metrics["loss"]))
            weights.append(float(new.metrics["weight"]))
            norms.append(float(new.metrics["grad_2.0_norm_total"]))
        s = new
    new = step.flush(s)
    if int(new.step) > int(s.step):
        losses.append(float(new.metrics["loss"]))
        weights.append(float(new.metrics["weight"]))
        norms.append(float(new.metrics["grad_2.0_norm_total"]))
    s = new
    assert_trees_equal(out.params, s.params)
    tally = out.slots["tally"]
    means = {k: float(x) for k, x in tally.means().items()}
    assert int(tally.updates) == len(losses)
    assert means["loss"] == pytest.approx(
        sum(x * w for x, w in zip(losses, weights, strict=True)) / sum(weights)
    )
    assert means["grad_2.0_norm_total"] == pytest.approx(sum(norms) / len(norms))
    # A second epoch starts its sums from zero, unless asked to continue them.
    again = ll.epoch(step, out, batches[:1])
    assert float(again.slots["tally"].weight) == 2.0
    more = ll.epoch(step, out, batches[:1], reset=False)
    assert float(more.slots["tally"].weight) == float(tally.weight) + 2.0


def test_after_sees_every_window_and_can_end_the_epoch() -> None:
    step, state, batches = setup(2)
    seen: list[tuple[int, int]] = []

    def after(s: ll.TrainState, ran: int) -> bool:
        seen.append((ran, int(s.step)))
        return ran >= 4

    out = ll.epoch(step, state, batches, after=after)
    assert seen == [(2, 1), (4, 2)]
    assert int(out.step) == 2 and int(out.slots["accumulate"].count) == 0


def test_epoch_guard_refuses_a_nan_update_and_raises_with_the_last_good_state() -> None:
    step, state, batches = setup()
    bad = (torch.full((2, 3), math.nan), torch.zeros(2))
    with pytest.raises(ll.NonFiniteLossError) as info:
        ll.epoch(step, state, [*batches[:2], bad, *batches[2:]])
    assert int(info.value.state.step) == 2
    assert_trees_equal(info.value.state.params, ll.fold(step, state, batches[:2]).params)
    out = ll.epoch(step, state, [*batches[:2], bad], guard=False)  # no guard: NaN goes in
    assert not bool(torch.isfinite(out.params["weight"]).all())


def test_a_state_of_another_model_and_a_detached_loss_are_named_through_fit() -> None:
    step, _, batches = setup()
    other = nn.Linear(5, 1)
    with pytest.raises(ValueError, match=r"fit\(state=...\): state.params\['weight'\] must have"):
        ll.fit(step, ll.init(other, ll.optim.adam(0.05)), batches, progress=False)
    model = nn.Linear(3, 1)
    detached = ll.train_step(model, lambda m, b: m(b[0]).sum().detach(), ll.optim.sgd(0.1))
    with pytest.raises(ValueError, match="it has no gradient: was it detached") as info:
        ll.fit(detached, ll.init(model, ll.optim.sgd(0.1)), batches, progress=False)
    assert info.value.__notes__[0].startswith("fit: while training on epoch 0, batch 0: (Tensor(")


def test_validate_with_ema_swaps_in_the_averaged_weights() -> None:
    """Validation with ``validate_with="ema"`` sees ll.ema's averaged weights; training is
    unchanged."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = ll.optim.sgd(0.1)
    step = ll.ema(0.5)(ll.train_step(model, loss_fn, opt))
    batches = [(torch.randn(4, 3), torch.randn(4)) for _ in range(3)]
    val = batches[:2]
    with_ema = ll.fit(step, ll.init(model, opt, seed=0), batches, val, max_epochs=1,
                      validate_with="ema", progress=False)  # fmt: skip
    plain = ll.fit(step, ll.init(model, opt, seed=0), batches, val, max_epochs=1, progress=False)
    averaged = ll.evaluate(step, ll.with_ema_params(with_ema.state), val)
    assert with_ema.history[0]["val_loss"] == pytest.approx(averaged["loss"])
    assert plain.history[0]["val_loss"] != pytest.approx(averaged["loss"])
    assert_trees_equal(with_ema.state.params, plain.state.params)  # training is unchanged


def test_result_best_is_the_best_epoch_state() -> None:
    step, state, batches = setup()
    ends: list[tuple[ll.TrainState, float]] = []
    result = ll.fit(step, state, batches, batches[:2], max_epochs=6, monitor="val_mae",
                    mode="max", on_epoch_end=lambda s, e: ends.append((s, e["val_mae"])),
                    progress=False)  # fmt: skip
    best = max(range(len(ends)), key=lambda i: (ends[i][1], -i))
    assert result.best is not None
    assert_trees_equal(result.best, ends[best][0])
    assert ll.fit(step, state, batches, max_epochs=1, progress=False).best is None
    with pytest.raises(ValueError, match=r"^fit\(monitor='nope'\): monitor must name a history"):
        ll.fit(step, state, batches, max_epochs=1, monitor="nope", mode="min", progress=False)
