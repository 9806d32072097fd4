"""Tests for looplib._fit: exact batch and step counts, stopping rules, history, errors.

The oracles are integer arithmetic for the data limits, a brute-force reading of the stopping
rule ("stop at the first epoch t >= min_epochs - 1 where stop(history[:t + 1]) holds"), a
hand-written ``torch.optim.SGD`` loop for the history's averages, and a step-by-step run of the
same step for the state a ``NonFiniteLossError`` keeps.
"""

from __future__ import annotations

import copy
import math
import re

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import looplib as ll
from looplib import NonFiniteLossError, batches_used, evaluate, fit

LR = 0.1


# -- helpers ------------------------------------------------------------------------------------
def tagged_batches(n: int, sizes: tuple[int, ...] = (2,), start: int = 0) -> list[tuple]:
    """``n`` batches ``(x, y, ids)``; every sample of batch ``i`` carries the id ``start + i``."""
    out = []
    for i in range(n):
        size = sizes[i % len(sizes)]
        x = torch.randn(size, 2)
        y = torch.randn(size)
        out.append((x, y, torch.full((size,), start + i)))
    return out


def mse(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch[0], batch[1]
    return (model(x).squeeze(-1) - y).pow(2).mean()


class Recorder:
    """A loss function that records which batch ids it sees, in training and in evaluation."""

    def __init__(self) -> None:
        self.train: list[int] = []
        self.eval: list[int] = []

    def __call__(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        if model.training and not torch.is_grad_enabled():
            # The step's one probe of the loss (no gradient), made before the first update to
            # learn the loss's metrics: not a training pass.
            return mse(model, batch)
        (self.train if model.training else self.eval).append(int(batch[2][0]))
        return mse(model, batch)


def setup(loss_fn=mse, lr: float = LR, model: nn.Module | None = None):
    model = nn.Linear(2, 1) if model is None else model
    opt = ll.optim.sgd(lr=lr)
    return ll.train_step(model, loss_fn, opt), ll.init(model, opt)


def split_by_epoch(seen: list[int], history: list[dict]) -> list[list[int]]:
    out, at = [], 0
    for entry in history:
        out.append(seen[at : at + entry["batches"]])
        at += entry["batches"]
    assert at == len(seen)
    return out


def shuffled(batches: list[tuple]):
    """A function ``epoch -> batches`` that gives a different order each epoch."""

    def per_epoch(epoch: int) -> list[tuple]:
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(epoch))
        return [batches[i] for i in order.tolist()]

    return per_epoch


def weighted(values: list[float], sizes: list[int]) -> float:
    """The mean of per-batch means, weighted by the batch sizes."""
    return sum(x * n for x, n in zip(values, sizes, strict=True)) / sum(sizes)


def same_params(a: ll.TrainState, b: ll.TrainState) -> bool:
    return all(torch.equal(a.params[k], b.params[k]) for k in a.params)


# -- data limits: exact batch counts ------------------------------------------------------------
def test_batches_used_reads_the_decimal_written() -> None:
    assert batches_used(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996 in binary
    assert batches_used(10, 0.25) == 2
    assert batches_used(10, 0.01) == 1  # never zero batches for a positive fraction
    assert batches_used(7, 1.0) == 7
    assert batches_used(0, 0.5) == 0


@given(n=st.integers(1, 500), k=st.integers(1, 1000))
def test_batches_used_is_floor_of_the_exact_product(n: int, k: int) -> None:
    assert batches_used(n, k / 1000) == max(1, k * n // 1000)


def test_train_fraction_029_of_100_batches_runs_29() -> None:
    loss = Recorder()
    step, state = setup(loss)
    batches = tagged_batches(100, sizes=(1,))
    result = fit(step, state, batches, max_epochs=1, train_fraction=0.29, progress=False)
    assert loss.train == list(range(29))
    assert result.history[0]["batches"] == 29
    assert int(result.state.step) == 29


@given(n=st.integers(1, 25), k=st.integers(1, 1000), reshuffle=st.booleans())
def test_each_epoch_runs_exactly_batches_used(n: int, k: int, reshuffle: bool) -> None:
    fraction = k / 1000
    keep = max(1, k * n // 1000)
    loss = Recorder()
    step, state = setup(loss)
    batches = tagged_batches(n, sizes=(1,))
    source = shuffled(batches) if reshuffle else batches
    result = fit(
        step, state, source, max_epochs=3, stop=None, train_fraction=fraction, progress=False
    )
    assert [e["batches"] for e in result.history] == [keep] * 3
    assert [e["step"] for e in result.history] == [keep, 2 * keep, 3 * keep]
    for epoch, seen in enumerate(split_by_epoch(loss.train, result.history)):
        order = source(epoch) if reshuffle else batches
        assert seen == [int(b[2][0]) for b in order[:keep]]  # the first ones, in order


@given(
    n=st.integers(1, 25),
    k=st.integers(1, 1000),
    reshuffle=st.booleans(),
    train_fraction=st.sampled_from([0.1, 0.5, 1.0]),
)
def test_overfit_trains_and_validates_on_the_same_fixed_batches(
    n: int, k: int, reshuffle: bool, train_fraction: float
) -> None:
    keep = max(1, k * n // 1000)
    loss = Recorder()
    step, state = setup(loss)
    batches = tagged_batches(n, sizes=(1,))
    source = shuffled(batches) if reshuffle else batches
    first = source(0) if reshuffle else batches
    expected = [int(b[2][0]) for b in first[:keep]]
    other_val = tagged_batches(3, start=1000)  # replaced by the overfit batches
    result = fit(
        step,
        state,
        source,
        other_val,
        max_epochs=3,
        stop=None,
        train_fraction=train_fraction,  # overridden
        overfit_fraction=k / 1000,
        progress=False,
    )
    assert [e["batches"] for e in result.history] == [keep] * 3
    assert split_by_epoch(loss.train, result.history) == [expected] * 3
    assert loss.eval == expected * 3
    assert all("val_loss" in e for e in result.history)


# -- min_epochs / max_epochs / max_steps --------------------------------------------------------
@given(
    min_epochs=st.integers(0, 5),
    extra=st.integers(0, 4),
    fires_at=st.integers(1, 10),
)
def test_epoch_limits_against_an_always_consulted_predicate(
    min_epochs: int, extra: int, fires_at: int
) -> None:
    max_epochs = max(1, min_epochs + extra)
    asked: list[int] = []

    def long_enough(history) -> bool:
        asked.append(len(history))
        return len(history) >= fires_at

    step, state = setup()
    result = fit(
        step,
        state,
        tagged_batches(2),
        min_epochs=min_epochs,
        max_epochs=max_epochs,
        stop=long_enough,
        progress=False,
    )
    epochs = min(max_epochs, max(min_epochs, fires_at, 1))
    assert len(result.history) == epochs
    assert [e["epoch"] for e in result.history] == list(range(epochs))
    # Asked after every epoch from the min_epochs-th on, never before.
    assert asked == list(range(max(min_epochs, 1), epochs + 1))
    if max(min_epochs, fires_at) <= max_epochs:
        assert result.stop_reason == "long_enough returned True"
    else:
        assert result.stop_reason == f"max_epochs={max_epochs} reached"


def simulate_updates(n: int, k: int, partial: str, max_epochs: int, max_steps: int | None):
    """Per epoch: (batches run, updates so far), and whether max_steps ended the run."""
    steps = count = 0
    out = []
    for _ in range(max_epochs):
        ran = 0
        for _ in range(n):
            ran += 1
            count += 1
            if count == k:
                steps, count = steps + 1, 0
            if max_steps is not None and steps >= max_steps:
                out.append((ran, steps))
                return out, True
        if count and partial == "step":
            steps, count = steps + 1, 0
        elif partial == "drop":
            count = 0
        out.append((ran, steps))
        if max_steps is not None and steps >= max_steps:
            return out, True
    return out, False


@given(
    n=st.integers(1, 7),
    k=st.integers(1, 4),
    partial=st.sampled_from(["step", "drop", "carry"]),
    max_epochs=st.integers(1, 4),
    max_steps=st.none() | st.integers(1, 12),
)
def test_updates_and_max_steps_counted_in_optimizer_updates(
    n: int, k: int, partial: str, max_epochs: int, max_steps: int | None
) -> None:
    step, state = setup()
    step = ll.accumulate(k, partial=partial)(step)
    result = fit(
        step,
        state,
        tagged_batches(n),
        max_epochs=max_epochs,
        max_steps=max_steps,
        stop=None,
        progress=False,
    )
    expected, by_steps = simulate_updates(n, k, partial, max_epochs, max_steps)
    assert [(e["batches"], e["step"]) for e in result.history] == expected
    assert int(result.state.step) == expected[-1][1]
    if by_steps:
        assert int(result.state.step) == max_steps
        assert result.stop_reason == f"max_steps={max_steps} reached"
    else:
        assert result.stop_reason == f"max_epochs={max_epochs} reached"


@pytest.mark.parametrize(
    ("partial", "per_epoch"),
    [("step", lambda n, k: -(-n // k)), ("drop", lambda n, k: n // k)],
)
def test_partial_window_policy_per_epoch(partial: str, per_epoch) -> None:
    n, k, epochs = 7, 3, 3
    step, state = setup()
    step = ll.accumulate(k, partial=partial)(step)
    result = fit(step, state, tagged_batches(n), max_epochs=epochs, progress=False)
    steps = [e["step"] for e in result.history]
    assert steps == [per_epoch(n, k) * (e + 1) for e in range(epochs)]  # ceil(7/3)=3, 7//3=2


def test_carry_policy_counts_updates_over_all_batches() -> None:
    n, k, epochs = 7, 3, 3
    step, state = setup()
    step = ll.accumulate(k, partial="carry")(step)
    result = fit(step, state, tagged_batches(n), max_epochs=epochs, progress=False)
    assert [e["step"] for e in result.history] == [(e + 1) * n // k for e in range(epochs)]
    assert int(result.state.step) == epochs * n // k  # 21 // 3 == 7
    assert int(result.state.slots["accumulate"].count) == (epochs * n) % k


def test_max_steps_stops_mid_epoch() -> None:
    step, state = setup()
    result = fit(step, state, tagged_batches(5), max_steps=7, progress=False)
    assert [(e["batches"], e["step"]) for e in result.history] == [(5, 5), (2, 7)]
    assert result.stop_reason == "max_steps=7 reached"


def test_continuing_a_history_counts_epochs_on() -> None:
    step, state = setup()
    first = fit(step, state, tagged_batches(2), max_epochs=2, progress=False)
    more = fit(step, first.state, tagged_batches(2), max_epochs=4, history=first.history)
    assert [e["epoch"] for e in more.history] == [0, 1, 2, 3]
    assert [e["step"] for e in more.history] == [2, 4, 6, 8]
    assert len(first.history) == 2  # the history passed in is not changed


# -- early stopping -----------------------------------------------------------------------------
def test_no_early_stopping_unless_asked_for() -> None:
    step, state = setup(lr=0.0)  # val_loss never changes: only epoch 0 improves
    batches = tagged_batches(2)
    result = fit(step, state, batches, batches, max_epochs=7, progress=False)
    assert len(result.history) == 7 and result.stop_reason == "max_epochs=7 reached"
    stop = ll.early_stopping("val_loss", patience=3)
    result = fit(step, state, batches, batches, max_epochs=50, stop=stop, progress=False)
    assert len(result.history) == 4
    assert result.stop_reason.startswith(
        "early_stopping(monitor='val_loss'): no improvement greater than 0.0 in 3 consecutive "
        "checks (best "
    )


def test_stop_none_runs_to_max_epochs() -> None:
    step, state = setup(lr=0.0)
    batches = tagged_batches(2)
    result = fit(step, state, batches, batches, max_epochs=6, stop=None, progress=False)
    assert len(result.history) == 6
    assert result.stop_reason == "max_epochs=6 reached"


def test_without_val_there_is_no_default_stop() -> None:
    step, state = setup(lr=0.0)
    result = fit(step, state, tagged_batches(2), max_epochs=6, progress=False)
    assert len(result.history) == 6
    assert all(not any(key.startswith("val_") for key in e) for e in result.history)
    assert result.stop_reason == "max_epochs=6 reached"


def test_custom_predicate_overrides_the_default() -> None:
    step, state = setup(lr=0.0)
    batches = tagged_batches(2)

    def two_epochs(history) -> bool:
        return len(history) >= 2

    result = fit(step, state, batches, batches, max_epochs=50, stop=two_epochs, progress=False)
    assert len(result.history) == 2
    assert result.stop_reason == "two_epochs returned True"
    never = fit(step, state, batches, batches, max_epochs=7, stop=ll.never, progress=False)
    assert len(never.history) == 7


def test_monitoring_val_metric_without_val_raises() -> None:
    step, state = setup()
    with pytest.raises(ValueError, match=re.escape("fit(stop=EarlyStopping(")) as info:
        fit(step, state, tagged_batches(2), stop=ll.early_stopping("val_loss"), progress=False)
    assert "monitors 'val_loss', which needs validation data" in str(info.value)
    assert "Pass val=..." in str(info.value)


class Scripted:
    """A loss whose evaluation reports a scripted ``score`` per epoch (one val batch per epoch)."""

    def __init__(self, script: list[float]) -> None:
        self.script = script
        self.evals = 0

    def __call__(self, model: nn.Module, batch: tuple):
        loss = mse(model, batch)
        if model.training:
            return loss, {"score": torch.tensor(0.0)}
        value = self.script[self.evals]
        self.evals += 1
        return loss, {"score": torch.tensor(value)}


def brute_force(stop, values: list[float], min_epochs: int, max_epochs: int):
    """(epochs run, stop reason) by the definition, on a history built by hand."""
    history = [{"epoch": i, "val_score": float(x)} for i, x in enumerate(values[:max_epochs])]
    for t in range(max(min_epochs - 1, 0), max_epochs):
        reason = ll.stop_reason(stop, history[: t + 1])
        if reason is not None:
            return t + 1, reason
    return max_epochs, f"max_epochs={max_epochs} reached"


def run_scripted(values, stop, min_epochs, max_epochs):
    loss = Scripted(values)
    step, state = setup(loss)
    batches = tagged_batches(2)
    return fit(
        step,
        state,
        batches,
        batches[:1],
        min_epochs=min_epochs,
        max_epochs=max_epochs,
        stop=stop,
        progress=False,
    )


def test_not_sticky_a_stop_met_during_min_epochs_is_forgotten_after_improvement() -> None:
    # Lightning #19966: this stops at min_epochs=8 although val improved every epoch since 3.
    values = [1.0, 2.0, 3.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    stop = ll.early_stopping("val_score", patience=2)
    assert stop([{"val_score": x} for x in values[:3]])  # holds at epoch 2
    result = run_scripted(values, stop, min_epochs=8, max_epochs=12)
    assert len(result.history) == 12
    assert result.stop_reason == "max_epochs=12 reached"
    assert [e["val_score"] for e in result.history] == pytest.approx(values)


def test_not_sticky_stops_when_the_rule_holds_again_later() -> None:
    values = [1.0, 2.0, 3.0, 0.5, 0.6, 0.7, 0.8, 0.9]
    stop = ll.early_stopping("val_score", patience=2)
    result = run_scripted(values, stop, min_epochs=4, max_epochs=8)
    assert len(result.history) == 6  # waits 2 checks after the improvement at epoch 3
    assert result.stop_reason == (
        "early_stopping(monitor='val_score'): no improvement greater than 0.0 in 2 consecutive "
        "checks (best 0.5 at epoch 3)"
    )


@given(
    values=st.lists(st.integers(0, 4), min_size=1, max_size=8),
    patience=st.integers(1, 3),
    min_epochs=st.integers(0, 8),
    use_predicate=st.booleans(),
)
def test_stopping_matches_the_brute_force_definition(
    values: list[int], patience: int, min_epochs: int, use_predicate: bool
) -> None:
    max_epochs = len(values)
    min_epochs = min(min_epochs, max_epochs)
    if use_predicate:

        def rose(history) -> bool:  # a plain function: the latest value is above the first
            return history[-1]["val_score"] > history[0]["val_score"]

        stop = rose
    else:
        stop = ll.early_stopping("val_score", patience=patience)
    result = run_scripted([float(x) for x in values], stop, min_epochs, max_epochs)
    epochs, reason = brute_force(stop, values, min_epochs, max_epochs)
    assert len(result.history) == epochs
    assert result.stop_reason == reason


# -- history content ----------------------------------------------------------------------------
def with_mae(model: nn.Module, batch: tuple):
    err = model(batch[0]).squeeze(-1) - batch[1]
    return err.pow(2).mean(), {"mae": err.abs().mean()}


def test_history_averages_against_a_hand_written_loop() -> None:
    torch.manual_seed(1)
    model = nn.Linear(2, 1)
    reference = copy.deepcopy(model)
    train = tagged_batches(4, sizes=(1, 5, 2, 7))
    val = tagged_batches(3, sizes=(6, 1, 3), start=100)
    step, state = setup(with_mae, model=model)
    step = ll.track_norm(2, per_param=False)(step)
    result = fit(step, state, train, val, max_epochs=2, stop=None, progress=False)

    torch_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    for epoch, entry in enumerate(result.history):
        losses, maes, norms, sizes = [], [], [], []
        for x, y, _ in train:
            torch_opt.zero_grad()
            loss, metrics = with_mae(reference, (x, y))
            loss.backward()
            grads = [p.grad for p in reference.parameters()]
            norms.append(float(torch.nn.utils.get_total_norm(grads, 2.0)))
            losses.append(float(loss.detach()))
            maes.append(float(metrics["mae"].detach()))
            sizes.append(len(x))
            torch_opt.step()
        assert entry["epoch"] == epoch
        assert entry["step"] == 4 * (epoch + 1)
        assert entry["batches"] == 4
        assert entry["loss"] == pytest.approx(weighted(losses, sizes))
        assert entry["mae"] == pytest.approx(weighted(maes, sizes))
        assert entry["grad_2.0_norm_total"] == pytest.approx(sum(norms) / len(norms))
        with torch.no_grad():
            vals = [with_mae(reference, (x, y)) for x, y, _ in val]
        vsizes = [len(b[0]) for b in val]
        vloss = weighted([float(v[0]) for v in vals], vsizes)
        vmae = weighted([float(v[1]["mae"]) for v in vals], vsizes)
        assert entry["val_loss"] == pytest.approx(vloss)
        assert entry["val_mae"] == pytest.approx(vmae)
        assert entry["time"] > 0
        assert entry["lr"] == pytest.approx(LR)  # the learning rate, with no user code
        assert list(entry) == [  # a fixed order
            "epoch",
            "step",
            "batches",
            "skipped",
            "loss",
            "mae",
            "lr",
            "grad_2.0_norm_total",
            "val_loss",
            "val_mae",
            "time",
        ]
        for key, value in entry.items():
            expected_type = int if key in ("epoch", "step", "batches", "skipped") else float
            assert type(value) is expected_type, (key, type(value))


@pytest.mark.parametrize("partial", ["step", "drop", "carry"])
def test_grad_norm_is_averaged_over_every_update_of_the_epoch(partial: str) -> None:
    # 5 batches, accumulate(2): the epoch's updates are two full windows, plus (for "step")
    # the partial window that the end of the epoch applies.
    train = tagged_batches(5, sizes=(3, 1, 2, 4, 2))
    step, state = setup()
    step = ll.chain(ll.accumulate(2, partial=partial), ll.track_norm(2, per_param=False))(step)
    result = fit(step, state, train, max_epochs=2, stop=None, progress=False)

    key = "grad_2.0_norm_total"
    s = state
    for entry in result.history:
        norms = []
        for batch in train:
            new = step(s, batch)
            if int(new.step) > int(s.step):
                norms.append(float(new.metrics[key]))
            s = new
        new = step.flush(s)
        if int(new.step) > int(s.step):
            norms.append(float(new.metrics[key]))
        s = new
        assert entry["step"] == int(s.step)
        assert entry[key] == pytest.approx(sum(norms) / len(norms))
    assert same_params(result.state, s)


def test_one_host_sync_per_epoch_for_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def syncs(n_batches: int, **kwargs) -> int:
        step, state = setup()
        batches = [(torch.randn(2, 2), torch.randn(2)) for _ in range(n_batches)]
        calls["n"] = 0
        fit(step, state, batches, max_epochs=2, stop=None, progress=False, **kwargs)
        return calls["n"]

    quiet = syncs(3, check_finite=False)
    assert quiet == syncs(12, check_finite=False)  # independent of the number of batches
    assert syncs(3) == syncs(12)  # the guard is read where fit reads anyway
    # Per epoch: one read at the end (the pending values, the step), the guard's check, and the
    # epoch's sums; at start, the step count.
    assert syncs(12) <= 1 + 2 * 3
    # A read point every log_every updates: one stacked read and the guard's check.
    assert syncs(12, log_every=1) - syncs(3, log_every=1) == 2 * (12 - 3) * 2
    assert syncs(12, log_every=3) - syncs(3, log_every=3) == 2 * (4 - 1) * 2


# -- non-finite loss ----------------------------------------------------------------------------
def finite_state(state: ll.TrainState) -> bool:
    leaves = [*state.params.values(), *optree.tree_leaves(state.opt_state)]
    return all(bool(torch.isfinite(x).all()) for x in leaves if x.is_floating_point())


def test_non_finite_loss_raises_and_keeps_the_last_good_state() -> None:
    epochs = [tagged_batches(4, sizes=(2, 3)) for _ in range(2)]
    epochs[1][2] = (torch.full((3, 2), math.nan), torch.zeros(3), torch.zeros(3))
    step, state = setup()
    with pytest.raises(
        NonFiniteLossError, match=re.escape("fit: an update at step 6 was not")
    ) as e:
        fit(step, state, lambda e: epochs[e], max_epochs=5, progress=False)
    err = e.value
    assert (err.epoch, err.step) == (1, 6)
    assert len(err.history) == 1

    good = state
    for batch in epochs[0]:
        good = step(good, batch)
    for batch in epochs[1][:2]:
        good = step(good, batch)
    assert int(err.state.step) == int(good.step) == 6
    assert same_params(err.state, good)  # frozen at the last good update, not trained past it
    assert finite_state(err.state)


def nan_gradient(model: nn.Module, batch: tuple) -> torch.Tensor:
    """A finite loss whose gradient is NaN on batches marked by id 13 (d/dx sqrt(x) at 0)."""
    out = model(batch[0]).squeeze(-1)
    loss = (out - batch[1]).pow(2).mean()
    if int(batch[2][0]) == 13:
        loss = loss + torch.sqrt((out.sum() * 0) ** 2)
    return loss


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_finite_loss_with_a_nan_gradient_never_reaches_the_state(tmp_path, optimizer) -> None:
    model = nn.Linear(2, 1)
    opt = ll.optim.sgd(LR) if optimizer == "sgd" else ll.optim.adam(0.01)
    step = ll.train_step(model, nan_gradient, opt)
    state = ll.init(model, opt)
    batches = tagged_batches(6)
    bad = [*batches[:3], tagged_batches(1, start=13)[0], *batches[3:]]
    ckpts = ll.Checkpoints(tmp_path, every_batches=1, keep_last=100)
    with pytest.raises(NonFiniteLossError) as e:
        fit(step, state, bad, max_epochs=2, progress=False, checkpoints=ckpts)
    assert int(e.value.state.step) == 3 and finite_state(e.value.state)
    reference = ll.fold(step, state, batches[:3])
    assert same_params(e.value.state, reference)
    for path in tmp_path.glob("ckpt-*"):  # every checkpoint saved is finite and before the NaN
        saved = ll.load(path)["state"]
        assert finite_state(saved) and int(saved.step) <= 3


def test_skip_nonfinite_in_the_chain_skips_and_counts_inside_fit() -> None:
    step, state = setup(nan_gradient)
    step = ll.skip_nonfinite(2)(step)
    good = tagged_batches(4)
    bad = tagged_batches(1, start=13)[0]
    epochs = [[*good[:2], bad, *good[2:]], good, [bad, *good]]
    result = fit(step, state, lambda e: epochs[e], max_epochs=3, progress=False)
    assert [h["skipped"] for h in result.history] == [1, 0, 1]
    assert [h["step"] for h in result.history] == [4, 8, 12]
    assert all(math.isfinite(h["loss"]) for h in result.history)
    # The skipped batch is left out of the epoch's loss: it equals the mean over the good ones.
    s = state
    losses = []
    for batch in good[:2]:
        s = step(s, batch)
        losses.append(float(s.metrics["loss"]))
    s = step(s, bad)
    for batch in good[2:]:
        s = step(s, batch)
        losses.append(float(s.metrics["loss"]))
    assert result.history[0]["loss"] == pytest.approx(sum(losses) / 4)
    # With check_finite=False the explicit skip still applies: the epoch's loss stays finite.
    quiet = fit(step, state, lambda e: epochs[e], max_epochs=3, check_finite=False, progress=False)
    assert all(math.isfinite(h["loss"]) for h in quiet.history)
    assert [h["skipped"] for h in quiet.history] == [1, 0, 1]


def test_too_many_skips_raise_the_skip_error_with_a_finite_state() -> None:
    step, state = setup(nan_gradient)
    step = ll.skip_nonfinite(0)(step)
    bad = tagged_batches(2, start=13)
    bad = [bad[0], tagged_batches(1, start=13)[0]]
    with pytest.raises(ll.NonFiniteGradientError) as e:
        fit(step, state, [*tagged_batches(2), *bad], max_epochs=1, progress=False)
    assert int(e.value.state.step) == 2 and finite_state(e.value.state)


def test_check_finite_false_continues() -> None:
    batches = tagged_batches(3)
    batches[1] = (torch.full((2, 2), math.nan), torch.zeros(2), torch.zeros(2))
    step, state = setup()
    result = fit(step, state, batches, max_epochs=3, check_finite=False, progress=False)
    assert len(result.history) == 3
    assert math.isnan(result.history[0]["loss"])


# -- evaluate -----------------------------------------------------------------------------------
def test_evaluate_is_pure_eval_mode_no_grad_and_weighted() -> None:
    model = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 1))
    grad_enabled: list[bool] = []
    modes: list[bool] = []

    def loss_fn(m: nn.Module, batch: tuple):
        grad_enabled.append(torch.is_grad_enabled())
        modes.append(m.training)
        return with_mae(m, batch)

    step, state = setup(loss_fn, model=model)
    state = fit(step, state, tagged_batches(3, sizes=(4,)), max_epochs=1, progress=False).state
    val = tagged_batches(3, sizes=(5, 2, 9), start=50)
    before = optree.tree_map(torch.clone, state)
    grad_enabled.clear()
    modes.clear()

    first = evaluate(step, state, val)
    assert evaluate(step, state, val) == first  # dropout off: deterministic
    assert grad_enabled == [False] * 6 and modes == [False] * 6
    assert model.training  # the template is back in train mode
    assert optree.tree_all(optree.tree_map(torch.equal, state, before))

    reference = copy.deepcopy(model).eval()
    sizes = [5, 2, 9]
    losses, maes = [], []
    with torch.no_grad():
        reference.load_state_dict({**state.params, **state.buffers})
        for x, y, _ in val:
            loss, metrics = with_mae(reference, (x, y))
            losses.append(float(loss))
            maes.append(float(metrics["mae"]))
    assert set(first) == {"loss", "mae"}
    assert all(type(x) is float for x in first.values())
    assert first["loss"] == pytest.approx(weighted(losses, sizes))
    assert first["mae"] == pytest.approx(weighted(maes, sizes))
    assert evaluate(step, state, []) == {}


def test_evaluate_rejects_a_non_step() -> None:
    _, state = setup()
    with pytest.raises(TypeError, match=re.escape("evaluate(step='x'): step must be a looplib")):
        evaluate("x", state, [])


# -- argument errors ----------------------------------------------------------------------------
BAD_ARGUMENTS = [
    (
        {"min_epochs": 5, "max_epochs": 3},
        ValueError,
        "fit(min_epochs=5): min_epochs must be <= max_epochs=3, got 5.",
    ),
    ({"max_epochs": 0}, ValueError, "fit(max_epochs=0): max_epochs must be a positive int, got 0."),
    (
        {"train_fraction": 0},
        ValueError,
        "fit(train_fraction=0): train_fraction must be a real number in (0.0, 1.0], got 0.",
    ),
    (
        {"train_fraction": 1.5},
        ValueError,
        "fit(train_fraction=1.5): train_fraction must be a real number in (0.0, 1.0], got 1.5.",
    ),
    (
        {"overfit_fraction": -0.1},
        ValueError,
        "fit(overfit_fraction=-0.1): overfit_fraction must be a real number in [0.0, 1.0], "
        "got -0.1.",
    ),
    (
        {"stop": 42},
        TypeError,
        "fit(stop=42): stop must be a predicate history -> bool, or None, got 42.",
    ),
    ({"max_steps": 0}, ValueError, "fit(max_steps=0): max_steps must be a positive int, got 0."),
    ({"progress": 1}, TypeError, "fit(progress=1): progress must be True, False or None, got 1."),
    ({"log_every": 0}, ValueError, "fit(log_every=0): log_every must be a positive int, got 0."),
    (
        {"on_epoch_end": 5},
        TypeError,
        "fit(on_epoch_end=5): on_epoch_end must be a function, or None, got 5.",
    ),
    ({"monitor": "val_loss"}, ValueError, "fit(mode=None): mode must be 'min' or 'max' with"),
    (
        {"validate_with": "ema"},
        ValueError,
        "fit(validate_with='ema'): validate_with 'ema' needs ll.ema in the step's chain",
    ),
]


@pytest.mark.parametrize(("kwargs", "exc", "message"), BAD_ARGUMENTS)
def test_bad_arguments_raise(kwargs: dict, exc: type, message: str) -> None:
    step, state = setup()
    with pytest.raises(exc, match=re.escape(message)):
        fit(step, state, tagged_batches(2), **kwargs)


def test_not_reiterable_batches_raise() -> None:
    step, state = setup()
    batches = tagged_batches(2)
    with pytest.raises(TypeError, match=r"fit\(train_batches=<generator object .*must be re-it"):
        fit(step, state, (b for b in batches), progress=False)
    with pytest.raises(TypeError, match=re.escape("wrap it: lambda epoch: make_batches().")):
        fit(step, state, (b for b in batches), progress=False)
    with pytest.raises(TypeError, match=r"fit\(val=<list_iterator .*val must be re-iterable"):
        fit(step, state, batches, iter(batches), progress=False)


def test_wrong_step_or_state_raise() -> None:
    step, state = setup()
    batches = tagged_batches(2)
    with pytest.raises(TypeError, match=re.escape("fit(step=None): step must be a looplib Step")):
        fit(None, state, batches)
    with pytest.raises(
        TypeError, match=re.escape("fit(state={}): state must be a looplib TrainState")
    ):
        fit(step, {}, batches)


def test_empty_epoch_raises() -> None:
    step, state = setup()
    with pytest.raises(ValueError, match="must yield at least one batch per epoch"):
        fit(step, state, [], progress=False)


# -- DataLoader and progress --------------------------------------------------------------------
class EpochSampler(Sampler[int]):
    def __init__(self, n: int) -> None:
        self.n = n
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def test_dataloader_as_train_batches_and_set_epoch() -> None:
    data = TensorDataset(torch.randn(10, 2), torch.randn(10))
    sampler = EpochSampler(10)
    loader = DataLoader(data, batch_size=3, sampler=sampler)
    assert isinstance(next(iter(loader)), list)  # default collate: [x, y]
    step, state = setup()
    result = fit(step, state, loader, loader, max_epochs=3, stop=None, progress=False)
    assert [e["batches"] for e in result.history] == [4, 4, 4]
    assert [e["step"] for e in result.history] == [4, 8, 12]
    assert sampler.epochs == [0, 1, 2]
    final = nn.Linear(2, 1)
    final.load_state_dict(result.state.params)
    with torch.no_grad():
        full = float(mse(final, data.tensors))
    assert result.history[-1]["val_loss"] == pytest.approx(full)  # by samples: the full mean

    limited = fit(step, state, loader, max_epochs=2, train_fraction=0.5, progress=False)
    assert [e["batches"] for e in limited.history] == [2, 2]


def test_progress_bar_writes_to_stderr_and_can_be_turned_off(
    capsys: pytest.CaptureFixture[str],
) -> None:
    step, state = setup()
    batches = tagged_batches(12)
    fit(step, state, batches, max_epochs=2, progress=True)
    err = capsys.readouterr().err
    assert "epoch 0" in err and "epoch 1" in err
    fit(step, state, batches, max_epochs=2, progress=False)
    assert capsys.readouterr().err == ""
