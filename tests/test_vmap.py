"""Ensembles: ll.vmap trains N members at once, and equals N separate runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import looplib as ll
from tests.helpers import assert_pure


def model(dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(dropout), nn.Linear(12, 3)
    ).double()


def loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple:
    x, y = batch
    out = m(x)
    return F.cross_entropy(out, y), {"acc": (out.argmax(-1) == y).double().mean()}


def batches(sizes: list[int], seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in sizes
    ]


CHAINS = {
    "plain": ll.chain(),
    "features": ll.chain(ll.skip_nonfinite(3), ll.accumulate(2), ll.track_norm(2), ll.clip(0.5)),
    "accumulate-after-skip": ll.chain(ll.accumulate(3), ll.skip_nonfinite(2), ll.clip(1.0)),
}


def assert_member_equal(member: ll.TrainState, alone: ll.TrainState, tol: float = 1e-9) -> None:
    for field in ("params", "buffers", "metrics"):
        a, b = getattr(member, field), getattr(alone, field)
        assert sorted(a) == sorted(b)
        for key in a:
            torch.testing.assert_close(
                a[key].to(b[key].dtype), b[key], rtol=tol, atol=tol, equal_nan=True, msg=key
            )
    assert int(member.step) == int(alone.step)
    assert torch.equal(member.slots["rng"], alone.slots["rng"])


@pytest.mark.parametrize("name", list(CHAINS))
@given(
    seeds=st.lists(st.integers(0, 2**40), min_size=1, max_size=4),
    sizes=st.lists(st.integers(2, 6), min_size=1, max_size=5),
    lr=st.sampled_from([1e-3, 1e-2]),
)
def test_members_trained_together_equal_separate_runs(
    name: str, seeds: list[int], sizes: list[int], lr: float
) -> None:
    # SGD with momentum: Adam would turn batched kernels' last-bit differences in the gradient of
    # the bias before BatchNorm (zero but for rounding) into differences of up to lr.
    net, opt = model(), ll.optim.sgd(lr * 10, momentum=0.9)
    step = CHAINS[name](ll.train_step(net, loss, opt))
    data = batches(sizes)
    starts = [step.init(ll.init(net, opt, seed=s), data[0]) for s in seeds]
    together = ll.fold(ll.vmap(step), ll.stack(starts), data)
    for member, start in zip(ll.unstack(together), starts, strict=True):
        assert_member_equal(member, ll.fold(step, start, data))


def test_each_member_gets_its_own_batch_with_batch_axis_0() -> None:
    net, opt = model(), ll.optim.sgd(0.1, momentum=0.9)
    step = CHAINS["features"](ll.train_step(net, loss, opt))
    per_member = [batches([4, 4, 4], seed=s) for s in range(3)]
    stacked = [
        tuple(torch.stack(parts) for parts in zip(*(m[t] for m in per_member), strict=True))
        for t in range(3)
    ]
    starts = [step.init(ll.init(net, opt, seed=s), per_member[s][0]) for s in range(3)]
    together = ll.fold(ll.vmap(step, batch_axis=0), ll.stack(starts), stacked)
    for member, start, data in zip(ll.unstack(together), starts, per_member, strict=True):
        assert_member_equal(member, ll.fold(step, start, data))


def test_a_member_with_a_bad_batch_skips_alone() -> None:
    net, opt = model(dropout=0.0), ll.optim.sgd(0.1)
    step = ll.skip_nonfinite(3)(ll.train_step(net, loss, opt))
    good = batches([4, 4])
    bad = [(good[0][0].clone(), good[0][1]), good[1]]
    bad[0][0][0, 0] = float("nan")
    stacked = [
        tuple(torch.stack(p) for p in zip(g, b, strict=True))
        for g, b in zip(good, bad, strict=True)
    ]
    start = step.init(ll.init(net, opt, seed=0), good[0])
    together = ll.unstack(ll.fold(ll.vmap(step, batch_axis=0), ll.stack([start, start]), stacked))
    assert int(together[0].step) == 2 and int(together[1].step) == 1
    assert int(together[1].slots["skip_nonfinite"].total) == 1
    assert_member_equal(together[0], ll.fold(step, start, good))


def test_the_vmapped_step_is_pure_and_flush_and_evaluate_work_per_member() -> None:
    net, opt = model(), ll.optim.adam(1e-2)
    step = CHAINS["features"](ll.train_step(net, loss, opt))
    data = batches([4, 4, 4])
    starts = [step.init(ll.init(net, opt, seed=s), data[0]) for s in range(2)]
    vstep = ll.vmap(step)
    state = assert_pure(vstep, ll.stack(starts), data[0])
    state = ll.fold(vstep, state, data[1:])
    flushed = ll.unstack(vstep.flush(state))
    metrics = vstep.evaluate(state, data[0])
    for i, start in enumerate(starts):
        alone = ll.fold(step, start, data)
        assert_member_equal(flushed[i], step.flush(alone))
        for key, value in step.evaluate(alone, data[0]).items():
            torch.testing.assert_close(metrics[key][i].to(value.dtype), value, rtol=1e-9, atol=1e-9)


def test_an_ensemble_state_round_trips_through_a_checkpoint(tmp_path) -> None:
    net, opt = model(), ll.optim.adam(1e-2)
    step = CHAINS["features"](ll.train_step(net, loss, opt))
    data = batches([4, 4, 4, 4])
    start = ll.stack([step.init(ll.init(net, opt, seed=s), data[0]) for s in range(3)])
    vstep = ll.vmap(step)
    half = ll.fold(vstep, start, data[:2])
    ll.save(half, tmp_path / "ensemble.ckpt")
    resumed = ll.fold(vstep, ll.load(tmp_path / "ensemble.ckpt"), data[2:])
    straight = ll.fold(vstep, start, data)
    for a, b in zip(ll.unstack(resumed), ll.unstack(straight), strict=True):
        assert_member_equal(a, b, tol=0)


def test_stack_and_vmap_check_their_arguments() -> None:
    net, opt = model(), ll.optim.sgd(0.1)
    step = ll.train_step(net, loss, opt)
    with pytest.raises(TypeError, match=r"^stack\(states=.*\): states must be a non-empty list"):
        ll.stack([])
    with pytest.raises(ValueError, match=r"^stack\(states\[1\]=.*must have the structure"):
        ll.stack([step.init(ll.init(net, opt), batches([2])[0]), ll.init(net, opt)])
    with pytest.raises(ValueError, match=r"^unstack\(state=.*\): state must be an ensemble state"):
        ll.unstack(ll.init(net, opt))
    with pytest.raises(TypeError, match=r"^vmap\(step=.*\): step must be a looplib Step"):
        ll.vmap(lambda s, b: s)
    with pytest.raises(ValueError, match=r"^vmap\(step=.*\): step must not be vmapped already"):
        ll.vmap(ll.vmap(step))
    with pytest.raises(
        TypeError, match=r"^vmap\(batch_axis='0'\): batch_axis must be None or an int"
    ):
        ll.vmap(step, batch_axis="0")


def test_fit_trains_an_ensemble_and_records_each_member() -> None:
    opt = ll.optim.sgd(0.1, momentum=0.9)
    nets = []
    for s in range(3):
        torch.manual_seed(s)
        nets.append(nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double())
    step = ll.chain(ll.accumulate(2), ll.clip(1.0))(ll.train_step(nets[0], loss, opt))
    data, val = batches([4] * 6), batches([4, 4], seed=9)
    starts = [step.init(ll.init(net, opt, seed=0), data[0]) for net in nets]
    together = ll.fit(ll.vmap(step), ll.stack(starts), data, val, max_epochs=2, progress=False)
    for i, start in enumerate(starts):
        alone = ll.fit(step, start, data, val, max_epochs=2, progress=False)
        for mine, theirs in zip(together.history, alone.history, strict=True):
            for key in ("loss", "acc", "val_loss", "val_acc"):
                assert mine[f"{key}/{i}"] == pytest.approx(theirs[key], rel=1e-9, abs=1e-12)
        assert_member_equal(ll.unstack(together.state)[i], alone.state)
    last = together.history[-1]
    assert last["val_loss"] == pytest.approx(sum(last[f"val_loss/{i}"] for i in range(3)) / 3)
