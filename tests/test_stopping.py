"""Tests for looplib._stopping: a brute-force oracle, laws, hand-computed runs, pinned errors."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplib._stopping import all_of, any_of, early_stopping, never, stop_reason

nan, inf = math.nan, math.inf
PREFIX = "early_stopping(monitor='val_loss'): "


def reference(
    history,
    monitor="val_loss",
    min_delta=0.0,
    patience=3,
    mode="min",
    stopping_threshold=None,
    divergence_threshold=None,
    baseline=None,
    check_finite=True,
):
    """The decision after the last entry of ``history``, written the most obvious way."""
    if not history:
        return False
    sign = 1.0 if mode == "min" else -1.0  # flip "max" so that smaller is always better
    values = [sign * entry[monitor] for entry in history if monitor in entry]
    best = math.inf if baseline is None else sign * baseline
    wait = 0
    for x in values:
        if math.isfinite(x) and x < best - min_delta:
            best = x
            wait = 0
        else:
            wait += 1
    last = values[-1]
    if check_finite and not math.isfinite(last):
        return True
    if stopping_threshold is not None and last < sign * stopping_threshold:
        return True
    if divergence_threshold is not None and last > sign * divergence_threshold:
        return True
    return wait >= patience


def run(values, monitor="val_loss", **kwargs):
    """Decisions of ``early_stopping`` after each epoch of a run with these monitor values."""
    stop = early_stopping(monitor, **kwargs)
    history = [{"epoch": i, monitor: x} for i, x in enumerate(values)]
    return [stop(history[: t + 1]) for t in range(len(history))]


def reason(values, monitor="val_loss", **kwargs):
    history = [{"epoch": i, monitor: x} for i, x in enumerate(values)]
    return stop_reason(early_stopping(monitor, **kwargs), history)


# ----------------------------------------------------------------------------------- strategies

GRID = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
VALUES = st.one_of(GRID, GRID, st.floats(-4, 4), st.sampled_from([nan, inf, -inf]))


@st.composite
def histories(draw, max_size=16):
    """Histories whose entries sometimes lack ``val_loss`` and carry other metrics."""
    n = draw(st.integers(0, max_size))
    history = []
    for i in range(n):
        entry = {"epoch": float(i), "loss": draw(GRID)}
        if draw(st.integers(0, 5)):
            entry["val_loss"] = draw(VALUES)
        history.append(entry)
    return history


@st.composite
def configs(draw):
    mode = draw(st.sampled_from(["min", "max"]))
    optional = st.one_of(st.none(), GRID, st.floats(-4, 4))
    s, d = draw(optional), draw(optional)
    if s is not None and d is not None and not (s < d if mode == "min" else s > d):
        d = None
    return {
        "min_delta": draw(st.one_of(st.sampled_from([0.0, 0.25, 0.5]), st.floats(0, 2))),
        "patience": draw(st.integers(1, 6)),
        "mode": mode,
        "stopping_threshold": s,
        "divergence_threshold": d,
        "baseline": draw(optional),
        "check_finite": draw(st.booleans()),
    }


# ------------------------------------------------------------------------------ oracle and laws


@settings(max_examples=300, deadline=None)
@given(config=configs(), history=histories())
def test_matches_brute_force_on_every_prefix(config, history):
    stop = early_stopping("val_loss", **config)
    for t in range(len(history) + 1):
        prefix = history[:t]
        if prefix and "val_loss" not in prefix[-1]:
            with pytest.raises(ValueError, match="no such metric in the latest history entry"):
                stop(prefix)
            continue
        decision = stop(prefix)
        assert decision is reference(prefix, **config)
        assert (stop_reason(stop, prefix) is None) is (not decision)


@settings(deadline=None)
@given(config=configs(), history=histories())
def test_max_mode_is_min_mode_on_negated_values(config, history):
    history = [e for e in history if "val_loss" in e]
    flipped = {
        **config,
        "mode": "max" if config["mode"] == "min" else "min",
        **{
            k: None if config[k] is None else -config[k]
            for k in ("stopping_threshold", "divergence_threshold", "baseline")
        },
    }
    negated = [{**e, "val_loss": -e["val_loss"]} for e in history]
    a, b = early_stopping(**config), early_stopping(**flipped)
    for t in range(len(history) + 1):
        assert a(history[:t]) is b(negated[:t])


@settings(deadline=None)
@given(history=histories(), patience=st.integers(1, 5), min_delta=GRID)
def test_more_patience_never_stops_sooner(history, patience, min_delta):
    history = [e for e in history if "val_loss" in e]
    kw = {"min_delta": min_delta, "check_finite": False}
    shorter = early_stopping(patience=patience, **kw)
    longer = early_stopping(patience=patience + 1, **kw)
    for t in range(len(history) + 1):
        assert not longer(history[:t]) or shorter(history[:t])


@settings(deadline=None)
@given(config=configs(), history=histories(), data=st.data())
def test_entries_without_the_monitor_are_not_checks(config, history, data):
    history = [e for e in history if "val_loss" in e]
    stop = early_stopping(**config)
    padded = []
    for e in history:
        padded += [{"loss": 0.5}] * data.draw(st.integers(0, 2)) + [dict(e)]
    assert stop(padded) is stop(history)


@given(config=configs(), history=histories())
def test_never_mutates_the_history(config, history):
    history = [e for e in history if "val_loss" in e]
    before = copy.deepcopy(history)
    early_stopping(**config)(history)
    assert repr(history) == repr(before)  # repr, since NaN != NaN


# --------------------------------------------------------------------------- hand-computed runs


def test_lightning_run_stops_after_three_checks_and_is_not_sticky():
    values = [1.0, 2.0, 3.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert run(values, patience=2) == [False, False, True] + [False] * 9
    assert reason(values[:3], patience=2) == (
        PREFIX + "no improvement greater than 0.0 in 2 consecutive checks (best 1.0 at epoch 0)"
    )
    assert reason(values[:4], patience=2) is None


def test_a_change_equal_to_min_delta_is_not_an_improvement():
    assert run([1.0, 0.5], min_delta=0.5, patience=1) == [False, True]
    assert run([1.0, 0.4375], min_delta=0.5, patience=1) == [False, False]
    assert run([1.0, 1.5], min_delta=0.5, patience=1, mode="max") == [False, True]
    assert run([1.0, 1.5625], min_delta=0.5, patience=1, mode="max") == [False, False]
    assert reason([1.0, 0.5], min_delta=0.5, patience=1) == (
        PREFIX + "no improvement greater than 0.5 in 1 consecutive check (best 1.0 at epoch 0)"
    )


def test_patience_one_stops_at_the_first_check_without_improvement():
    assert run([1.0, 0.9, 0.9, 0.8, 0.85], patience=1) == [False, False, True, False, True]


def test_mode_max():
    acc = [0.5, 0.6, 0.6, 0.55, 0.7]
    assert run(acc, "val_acc", patience=2, mode="max") == [False, False, False, True, False]
    assert reason(acc[:4], "val_acc", patience=2, mode="max") == (
        "early_stopping(monitor='val_acc'): no improvement greater than 0.0 "
        "in 2 consecutive checks (best 0.6 at epoch 1)"
    )


def test_the_first_finite_value_is_an_improvement():
    assert run([5.0], patience=1) == [False]
    assert run([-5.0], patience=1, mode="max") == [False]


@pytest.mark.parametrize("bad", [nan, inf, -inf])
def test_a_non_finite_value_stops_with_its_own_reason(bad):
    assert run([0.5, bad, 0.4], patience=5) == [False, True, False]
    assert reason([0.5, bad], patience=5) == PREFIX + f"val_loss is not finite ({bad}) at epoch 1"


def test_without_check_finite_a_non_finite_value_never_improves_nor_becomes_best():
    assert run([nan, nan, 0.5, nan, 0.5], patience=3, check_finite=False) == [False] * 5
    assert run([nan, 1.0], patience=1, check_finite=False) == [True, False]
    assert run([1.0, -inf, 0.9], patience=1, check_finite=False) == [False, True, False]
    assert run([1.0, inf], patience=1, check_finite=False, mode="max") == [False, True]
    assert reason([0.5, nan, nan], patience=2, check_finite=False) == (
        PREFIX + "no improvement greater than 0.0 in 2 consecutive checks (best 0.5 at epoch 0)"
    )
    assert reason([nan], patience=1, check_finite=False) == (
        PREFIX + "no improvement greater than 0.0 in 1 consecutive check (no finite value yet)"
    )


def test_stopping_threshold_is_strict():
    assert run([0.2, 0.05, 0.04], stopping_threshold=0.05) == [False, False, True]
    assert reason([0.2, 0.04], stopping_threshold=0.05) == (
        PREFIX + "val_loss=0.04 crossed stopping_threshold=0.05 at epoch 1"
    )
    assert run([0.9, 0.95], "acc", mode="max", stopping_threshold=0.9) == [False, True]


def test_divergence_threshold_is_strict():
    assert run([0.2, 2.0, 5.0], divergence_threshold=2.0) == [False, False, True]
    assert reason([0.2, 5.0], divergence_threshold=2.0) == (
        PREFIX + "val_loss=5.0 diverged past divergence_threshold=2.0 at epoch 1"
    )
    assert run([0.5, 0.05], "acc", mode="max", divergence_threshold=0.1) == [False, True]
    assert run([1.0, inf], divergence_threshold=2.0, check_finite=False) == [False, True]
    assert run([1.0, nan], divergence_threshold=2.0, check_finite=False) == [False, False]


def test_rules_are_reported_in_a_fixed_order():
    # non-finite, then stopping_threshold, then divergence_threshold, then patience
    assert "crossed stopping_threshold" in reason(
        [0.5, 0.6, 0.01], patience=1, stopping_threshold=0.1
    )
    assert "diverged" in reason([0.5, 3.0], patience=1, divergence_threshold=2.0)
    assert "not finite" in reason([0.5, inf], patience=1, divergence_threshold=2.0)


def test_baseline_must_also_be_beaten():
    assert run([0.6, 0.55, 0.4], patience=2, baseline=0.5) == [False, True, False]
    assert reason([0.6, 0.55], patience=2, baseline=0.5) == (
        PREFIX
        + "no improvement greater than 0.0 in 2 consecutive checks (nothing beat baseline=0.5)"
    )
    assert run([0.25], patience=1, baseline=0.5, min_delta=0.25) == [True]
    assert run([0.125], patience=1, baseline=0.5, min_delta=0.25) == [False]
    assert run([0.6, 0.7], "acc", patience=2, mode="max", baseline=0.5) == [False, False]


def test_empty_history_and_entries_without_the_monitor():
    stop = early_stopping(patience=1)
    assert stop([]) is False
    assert stop_reason(stop, []) is None
    history = [
        {"epoch": 0, "val_loss": 1.0},
        {"epoch": 1, "loss": 0.3},
        {"epoch": 2, "val_loss": 1.0},
    ]
    assert stop(history) is True
    assert stop_reason(stop, history) == (
        PREFIX + "no improvement greater than 0.0 in 1 consecutive check (best 1.0 at epoch 0)"
    )


def test_reasons_use_the_epoch_key_else_the_index():
    stop = early_stopping(patience=1)
    assert "(best 1.0 at epoch 7)" in stop_reason(stop, [{"epoch": 7.0, "val_loss": 1.0}] * 2)
    assert "(best 1.0 at epoch 0)" in stop_reason(stop, [{"val_loss": 1.0}] * 2)
    assert stop_reason(stop, [{"val_loss": 1.0}, {"val_loss": nan}]).endswith("at epoch 1")


def test_reasons_shorten_long_floats():
    assert "val_loss=0.3 crossed stopping_threshold=0.5" in reason(
        [0.1 + 0.2], stopping_threshold=0.5
    )


def test_predicate_returns_exact_bools_and_exposes_its_arguments():
    stop = early_stopping("val_acc", 0.25, 4, "max", baseline=0.5, divergence_threshold=0.1)
    assert (stop.monitor, stop.min_delta, stop.patience, stop.mode) == ("val_acc", 0.25, 4, "max")
    assert (stop.baseline, stop.divergence_threshold, stop.stopping_threshold) == (0.5, 0.1, None)
    assert stop.check_finite is True
    assert stop.monitors == ("val_acc",)
    assert stop([{"val_acc": 0.9}]) is False
    assert stop([{"val_acc": 0.05}]) is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        stop.patience = 1  # type: ignore[misc]
    assert early_stopping() == early_stopping("val_loss", 0.0, 3, "min")


def test_accepts_ints_and_tuples():
    stop = early_stopping(patience=1)
    assert stop(({"val_loss": 1}, {"val_loss": 1})) is True


# ---------------------------------------------------------------------- reasons and combinators


def too_long(history):
    return len(history) >= 3


def test_stop_reason_for_hand_written_predicates():
    assert stop_reason(too_long, [{}] * 2) is None
    assert stop_reason(too_long, [{}] * 3) == "too_long returned True"
    assert stop_reason(lambda h: True, []) == "<lambda> returned True"
    partial = functools.partial(lambda h, n: len(h) >= n, n=1)
    assert stop_reason(partial, [{}]) == f"{partial!r} returned True"


def test_a_hand_written_predicate_returning_none_raises():
    def forgot(history):
        len(history) > 2  # noqa: B015

    with pytest.raises(TypeError, match=re.escape("forgot(history) returned None;")):
        stop_reason(forgot, [])
    with pytest.raises(TypeError, match="is a return statement missing"):
        any_of(forgot)([])


def test_never():
    assert never([{"loss": nan}] * 10) is False
    assert stop_reason(never, [{"loss": 1.0}]) is None


def test_any_of_fires_when_one_fires_with_the_first_reason():
    patience = early_stopping(patience=1)
    threshold = early_stopping("loss", stopping_threshold=0.1)
    stop = any_of(patience, threshold, too_long)
    h = [{"epoch": 0, "loss": 0.5, "val_loss": 1.0}, {"epoch": 1, "loss": 0.05, "val_loss": 1.0}]
    assert stop(h[:1]) is False and stop_reason(stop, h[:1]) is None
    assert stop(h) is True
    assert stop_reason(stop, h) == stop_reason(patience, h)
    assert stop_reason(any_of(threshold, patience), h) == (
        "early_stopping(monitor='loss'): loss=0.05 crossed stopping_threshold=0.1 at epoch 1"
    )
    assert stop_reason(stop, h * 2) == stop_reason(patience, h * 2)
    assert stop_reason(any_of(never, too_long), h * 2) == "too_long returned True"


def test_all_of_fires_when_all_fire_and_joins_the_reasons():
    patience = early_stopping(patience=1)
    stop = all_of(patience, too_long)
    h = [{"epoch": i, "val_loss": 1.0} for i in range(3)]
    assert stop(h[:2]) is False and stop_reason(stop, h[:2]) is None
    assert stop(h) is True
    assert stop_reason(stop, h) == (
        PREFIX + "no improvement greater than 0.0 in 2 consecutive checks (best 1.0 at epoch 0); "
        "too_long returned True"
    )


def test_combinators_evaluate_every_member():
    stop = any_of(too_long, early_stopping("val_los"))
    with pytest.raises(ValueError, match="no such metric"):
        stop([{"val_loss": 1.0}] * 3)


def test_combinators_union_the_monitors_in_order():
    a, b = early_stopping("val_loss"), early_stopping("loss")
    assert any_of(a, too_long, b, a).monitors == ("val_loss", "loss")
    assert all_of(b, a).monitors == ("loss", "val_loss")
    assert any_of(all_of(b), a).monitors == ("loss", "val_loss")
    assert any_of(never).monitors == ()


# ------------------------------------------------------------------------------ invalid input


def message(text):
    return "^" + re.escape(text) + "$"


@pytest.mark.parametrize(
    ("kwargs", "exc", "text"),
    [
        ({"patience": 0}, ValueError, "early_stopping(patience=0): patience must be a positive int, got 0."),
        ({"patience": 1.5}, TypeError, "early_stopping(patience=1.5): patience must be a positive int, got 1.5."),
        ({"patience": True}, TypeError, "early_stopping(patience=True): patience must be a positive int, got True."),
        ({"min_delta": -0.1}, ValueError, "early_stopping(min_delta=-0.1): min_delta must be a non-negative real number, got -0.1."),
        ({"min_delta": inf}, ValueError, "early_stopping(min_delta=inf): min_delta must be a non-negative real number, got inf."),
        ({"min_delta": nan}, ValueError, "early_stopping(min_delta=nan): min_delta must be a non-negative real number, got nan."),
        ({"min_delta": "0"}, TypeError, "early_stopping(min_delta='0'): min_delta must be a non-negative real number, got '0'."),
        ({"mode": "auto"}, ValueError, "early_stopping(mode='auto'): mode must be one of ['min', 'max'], got 'auto'."),
        ({"mode": "MIN"}, ValueError, "early_stopping(mode='MIN'): mode must be one of ['min', 'max'], got 'MIN'."),
        ({"monitor": ""}, ValueError, "early_stopping(monitor=''): monitor must be a non-empty str, got ''."),
        ({"monitor": None}, TypeError, "early_stopping(monitor=None): monitor must be a non-empty str, got None."),
        ({"stopping_threshold": nan}, ValueError, "early_stopping(stopping_threshold=nan): stopping_threshold must be a finite real number, got nan."),
        ({"stopping_threshold": "0.1"}, TypeError, "early_stopping(stopping_threshold='0.1'): stopping_threshold must be a finite real number, got '0.1'."),
        ({"divergence_threshold": inf}, ValueError, "early_stopping(divergence_threshold=inf): divergence_threshold must be a finite real number, got inf."),
        ({"baseline": -inf}, ValueError, "early_stopping(baseline=-inf): baseline must be a finite real number, got -inf."),
        ({"check_finite": 1}, TypeError, "early_stopping(check_finite=1): check_finite must be a bool, got 1."),
        (
            {"stopping_threshold": 1.0, "divergence_threshold": 0.5},
            ValueError,
            "early_stopping(divergence_threshold=0.5): divergence_threshold must be greater than "
            "stopping_threshold=1.0 for mode='min', got 0.5. Otherwise some values both stop and diverge.",
        ),
        (
            {"mode": "max", "stopping_threshold": 0.5, "divergence_threshold": 0.5},
            ValueError,
            "early_stopping(divergence_threshold=0.5): divergence_threshold must be less than "
            "stopping_threshold=0.5 for mode='max', got 0.5. Otherwise some values both stop and diverge.",
        ),
    ],
)  # fmt: skip
def test_invalid_arguments(kwargs, exc, text):
    with pytest.raises(exc, match=message(text)):
        early_stopping(**kwargs)


def test_missing_monitor_lists_the_available_metrics():
    stop = early_stopping(monitor="val_los")
    history = [{"epoch": 0, "loss": 0.9, "val_loss": 0.8}]
    text = (
        "early_stopping(monitor='val_los'): no such metric in the latest history entry; "
        "available: ['epoch', 'loss', 'val_loss']."
    )
    with pytest.raises(ValueError, match=message(text)):
        stop(history)
    with pytest.raises(ValueError, match=message(text)):
        stop_reason(stop, history)
    with pytest.raises(ValueError, match=r"available: \['loss'\]"):
        early_stopping()([{"val_loss": 1.0}, {"loss": 0.5}])


@pytest.mark.parametrize(
    ("history", "exc", "text"),
    [
        (None, TypeError, "history must be a sequence of dicts of floats, oldest first, got None."),
        ("abc", TypeError, "history must be a sequence of dicts of floats, oldest first, got 'abc'."),
        ({"val_loss": 1.0}, TypeError, "history must be a sequence of dicts of floats, oldest first, got {'val_loss': 1.0}."),
        ([{"val_loss": 1.0}, 3], TypeError, "history[1] must be a dict of metric names to floats, got 3."),
        ([{"val_loss": "x"}], TypeError, "history[0]['val_loss'] must be a real number, got 'x'."),
        ([{"val_loss": True}], TypeError, "history[0]['val_loss'] must be a real number, got True."),
        (
            [{"val_loss": torch.tensor(1.0)}],
            TypeError,
            "history[0]['val_loss'] must be a real number, got Tensor(shape=(), dtype=torch.float32).",
        ),
    ],
)  # fmt: skip
def test_invalid_histories(history, exc, text):
    with pytest.raises(exc, match="^" + re.escape(PREFIX + text)):
        early_stopping()(history)


def test_invalid_combinator_arguments():
    stop = early_stopping()
    for name, combine in (("any_of", any_of), ("all_of", all_of)):
        with pytest.raises(
            ValueError,
            match=message(
                f"{name}(predicates=()): predicates must hold at least one predicate, got ()."
            ),
        ):
            combine()
        with pytest.raises(
            TypeError,
            match=message(
                f"{name}(predicates[1]=3): predicates[1] must be a callable history -> bool, got 3."
            ),
        ):
            combine(stop, 3)
    with pytest.raises(
        TypeError,
        match=message(
            "stop_reason(predicate='stop'): predicate must be a callable history -> bool, got 'stop'."
        ),
    ):
        stop_reason("stop", [])
