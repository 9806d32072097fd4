"""The error contract, fuzzed: every public factory and ``fit`` reject a bad argument at once,
with looplib's message and never with an error from deep inside torch.

The shape, for every generated invalid configuration::

    accumulate(k=0): k must be a positive int, got 0.

that is ``^func(arg=`` and ``): arg <rule>, got <value>.``, a TypeError for a value of the wrong
kind and a ValueError for one out of range, raised by ``looplib/_validate.py``. Valid
configurations, drawn from the same tables, never raise (and a step built from them runs).

Also: a step whose output changes structure, shape or dtype is named by the path of the leaf,
and a batch that breaks the loss inside ``fit`` keeps its own error, with a note naming the
epoch, the batch and the layout of the batches that ran before.
"""

from __future__ import annotations

import inspect
import math
import re
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import looplib as ll
from looplib._step import Micro, Stage
from looplib._transform import stage_transformer
from tests.helpers import mlp, mse, regression_batch, sequence_batch, sequence_loss, sequence_model

# ---------------------------------------------------------------------------- bad values by kind
# Each is a strategy of (value, exception type) that a check of that kind must reject.
WRONG_KIND = st.sampled_from(["3", b"3", [3], (3,), {"k": 3}, object(), True, False, 3j])
NAN = float("nan")


def wrong(*values: Any) -> st.SearchStrategy[tuple[Any, type]]:
    """Values of the wrong kind (TypeError), plus ``values`` (ValueError)."""
    kind = st.tuples(WRONG_KIND, st.just(TypeError))
    return st.one_of(kind, st.tuples(st.sampled_from(values), st.just(ValueError)))


BAD_POSITIVE_INT = st.one_of(
    st.tuples(st.integers(max_value=0), st.just(ValueError)),
    st.tuples(st.sampled_from([1.0, 2.5, NAN, math.inf, None]), st.just(TypeError)),
    wrong(0, -1),
)
BAD_NONNEGATIVE_INT = st.one_of(
    st.tuples(st.integers(max_value=-1), st.just(ValueError)),
    st.tuples(st.sampled_from([0.0, 1.5, NAN, None]), st.just(TypeError)),
    wrong(-1),
)
BAD_POSITIVE_OR_INF = st.one_of(
    st.tuples(st.floats(max_value=0.0), st.just(ValueError)),
    st.tuples(st.sampled_from([None, "1"]), st.just(TypeError)),
    wrong(NAN, -math.inf, 0, -3),
)
BAD_NONNEGATIVE = st.one_of(
    st.tuples(st.floats(max_value=-1e-300), st.just(ValueError)),
    st.tuples(st.just(None), st.just(TypeError)),
    wrong(NAN, math.inf, -1),
)
BAD_OPTIONAL_FINITE = st.one_of(
    st.tuples(st.just("1.0"), st.just(TypeError)), wrong(NAN, math.inf, -math.inf)
)
BAD_FINITE = st.one_of(
    st.tuples(st.just(None), st.just(TypeError)), wrong(NAN, math.inf, -math.inf)
)
BAD_NORM = st.one_of(
    st.tuples(st.floats(max_value=0.0), st.just(ValueError)),
    st.tuples(st.sampled_from(["two", "Infinity", None]), st.just(TypeError)),
    wrong(NAN, 0, -2),
)
BAD_BOOL = st.tuples(st.sampled_from([0, 1, "True", None, 1.0]), st.just(TypeError))
BAD_LR = st.one_of(
    st.tuples(st.floats(max_value=-1e-300), st.just(ValueError)),
    st.tuples(st.sampled_from([None, "0.1", [0.1]]), st.just(TypeError)),
    st.tuples(st.sampled_from([NAN, math.inf, -math.inf]), st.just(ValueError)),
)
BAD_BETAS = st.one_of(
    st.tuples(st.sampled_from([0.9, None, (0.9,), (0.9, 0.99, 0.999), "ab"]), st.just(TypeError)),
    st.tuples(st.sampled_from([(0.9, "x"), (None, 0.9)]), st.just(TypeError)),
    st.tuples(
        st.tuples(st.floats(0, 0.99), st.floats(min_value=1.0, allow_infinity=False)),
        st.just(ValueError),
    ),
    st.tuples(st.sampled_from([(-0.1, 0.9), (NAN, 0.9), (0.9, 1.0)]), st.just(ValueError)),
)


def bad_fraction(low_open: bool) -> st.SearchStrategy[tuple[Any, type]]:
    outside = st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.000001))
    values = st.one_of(outside, st.just(0.0)) if low_open else outside
    return st.one_of(
        st.tuples(values.filter(math.isfinite), st.just(ValueError)),
        st.tuples(st.sampled_from([None, "0.5"]), st.just(TypeError)),
        wrong(NAN, math.inf),
    )


def bad_choice(choices: list[str]) -> st.SearchStrategy[tuple[Any, type]]:
    text = st.text(max_size=6).filter(lambda s: s not in choices)
    return st.tuples(st.one_of(text, st.sampled_from([None, 3])), st.just(ValueError))


BAD_CALLABLE_OR_NONE = st.tuples(st.sampled_from([3, "fn", [len]]), st.just(TypeError))

# ------------------------------------------------------------------------ the functions' tables
# name -> (factory, {arg: (valid strategy, invalid strategy)}, fixup of valid kwargs)
Table = dict[str, tuple[Callable[..., Any], dict[str, tuple[Any, Any]], Callable[[dict], dict]]]


def _no_fix(kwargs: dict) -> dict:
    return kwargs


def _sgd_fix(kwargs: dict) -> dict:
    if kwargs.get("nesterov") is True:
        kwargs["momentum"] = max(kwargs.get("momentum", 0.0), 0.5)
        kwargs["dampening"] = 0.0
    return kwargs


def _stopping_fix(kwargs: dict) -> dict:
    s, d = kwargs.get("stopping_threshold"), kwargs.get("divergence_threshold")
    if s is not None and d is not None:
        lo, hi = sorted((s, d))
        hi = hi if hi > lo else lo + 1.0
        kwargs["stopping_threshold"], kwargs["divergence_threshold"] = (
            (lo, hi) if kwargs.get("mode", "min") == "min" else (hi, lo)
        )
    return kwargs


finite_floats = st.floats(-1e6, 1e6, allow_nan=False)
optional_finite = st.one_of(st.none(), finite_floats)
lrs = st.one_of(st.floats(0, 10), st.just(lambda count: 0.1))
norms = st.one_of(st.floats(0.5, 8), st.sampled_from([math.inf, "inf", "INF", 1, 2]))

FACTORIES: Table = {
    "accumulate": (
        ll.accumulate,
        {
            "k": (st.integers(1, 5), BAD_POSITIVE_INT),
            "partial": (
                st.sampled_from(["step", "drop", "carry"]),
                bad_choice(["step", "drop", "carry"]),
            ),
        },
        _no_fix,
    ),
    "clip": (
        ll.clip,
        {
            "max_norm": (st.one_of(st.floats(1e-3, 1e3), st.just(math.inf)), BAD_POSITIVE_OR_INF),
            "norm_type": (norms, BAD_NORM),
        },
        _no_fix,
    ),
    "track_norm": (
        ll.track_norm,
        {"norm_type": (norms, BAD_NORM), "per_param": (st.booleans(), BAD_BOOL)},
        _no_fix,
    ),
    "tbptt_split": (
        ll.tbptt_split,
        {
            "steps": (st.integers(1, 6), BAD_POSITIVE_INT),
            "split": (st.sampled_from([None, ll.split_time]), BAD_CALLABLE_OR_NONE),
        },
        _no_fix,
    ),
    "skip_nonfinite": (
        ll.skip_nonfinite,
        {"max_consecutive": (st.integers(0, 5), BAD_NONNEGATIVE_INT)},
        _no_fix,
    ),
    "sgd": (
        ll.optim.sgd,
        {
            "lr": (lrs, BAD_LR),
            "momentum": (st.floats(0, 0.99), BAD_NONNEGATIVE),
            "dampening": (st.floats(0, 0.5), BAD_FINITE),
            "weight_decay": (st.floats(0, 0.1), BAD_NONNEGATIVE),
            "nesterov": (st.booleans(), BAD_BOOL),
        },
        _sgd_fix,
    ),
    "adam": (
        ll.optim.adam,
        {
            "lr": (lrs, BAD_LR),
            "betas": (st.tuples(st.floats(0, 0.99), st.floats(0, 0.999)), BAD_BETAS),
            "eps": (st.floats(0, 1e-3), BAD_NONNEGATIVE),
            "weight_decay": (st.floats(0, 0.1), BAD_NONNEGATIVE),
        },
        _no_fix,
    ),
    "adamw": (
        ll.optim.adamw,
        {
            "lr": (lrs, BAD_LR),
            "betas": (st.tuples(st.floats(0, 0.99), st.floats(0, 0.999)), BAD_BETAS),
            "eps": (st.floats(0, 1e-3), BAD_NONNEGATIVE),
            "weight_decay": (st.floats(0, 0.1), BAD_NONNEGATIVE),
        },
        _no_fix,
    ),
    "early_stopping": (
        ll.early_stopping,
        {
            "monitor": (
                st.sampled_from(["loss", "val_loss"]),
                st.one_of(
                    st.tuples(st.just(""), st.just(ValueError)),
                    st.tuples(st.sampled_from([None, 3, ["loss"]]), st.just(TypeError)),
                ),
            ),
            "min_delta": (st.floats(0, 1), BAD_NONNEGATIVE),
            "patience": (st.integers(1, 5), BAD_POSITIVE_INT),
            "mode": (st.sampled_from(["min", "max"]), bad_choice(["min", "max"])),
            "stopping_threshold": (optional_finite, BAD_OPTIONAL_FINITE),
            "divergence_threshold": (optional_finite, BAD_OPTIONAL_FINITE),
            "baseline": (optional_finite, BAD_OPTIONAL_FINITE),
            "check_finite": (st.booleans(), BAD_BOOL),
        },
        _stopping_fix,
    ),
}


def assert_looplib_message(info: pytest.ExceptionInfo[BaseException], func: str, arg: str) -> None:
    message = str(info.value)
    assert re.match(rf"^{re.escape(func)}\({re.escape(arg)}=", message), message
    assert f"): {arg} " in message and ", got " in message, message
    last = traceback.extract_tb(info.tb)[-1]
    assert Path(last.filename).parts[-2:] == ("looplib", "_validate.py"), last


@st.composite
def configurations(draw: st.DrawFn, table: Table) -> tuple[str, dict, str | None, type | None]:
    """A function, valid kwargs for it, and (maybe) one argument replaced by a bad value."""
    func = draw(st.sampled_from(sorted(table)))
    _, args, fix = table[func]
    required = [
        p.name
        for p in inspect.signature(table[func][0]).parameters.values()
        if p.default is inspect.Parameter.empty and p.name in args
    ]
    optional = sorted(set(args) - set(required))
    names = required + draw(st.lists(st.sampled_from(optional), unique=True))
    kwargs = fix({name: draw(args[name][0]) for name in names})
    if not draw(st.booleans()):
        return func, kwargs, None, None
    arg = draw(st.sampled_from(sorted(args)))
    value, exc = draw(args[arg][1])
    return func, {**kwargs, arg: value}, arg, exc


def _run_transformer(transformer: ll.Transformer) -> None:
    model = sequence_model()
    opt = ll.optim.sgd(0.05)
    step = transformer(ll.train_step(model, sequence_loss, opt))
    state = ll.init(model, opt)
    for i in range(2):
        state = step(state, sequence_batch(seed=i))
    step.flush(state)


@given(configurations(FACTORIES))
def test_every_factory_rejects_bad_arguments_by_name(config: tuple) -> None:
    func, kwargs, arg, exc = config
    factory = FACTORIES[func][0]
    if arg is None:
        made = factory(**kwargs)
        if isinstance(made, ll.Transformer):
            _run_transformer(made)
        elif isinstance(made, ll.Optimizer):
            params = {"w": torch.ones(3)}
            made.update({"w": torch.full((3,), 0.5)}, made.init(params), params)
        else:
            made([{"epoch": 0, "loss": 1.0, "val_loss": 1.0}])
        return
    assert exc is not None
    with pytest.raises(exc) as info:
        factory(**kwargs)
    assert_looplib_message(info, func, arg)


# -------------------------------------------------------------------- combinators and the chain
NOT_CALLABLE = st.sampled_from([3, "loss", None, 1.5, ["a"]])


@given(
    st.sampled_from(["any_of", "all_of"]),
    st.lists(st.booleans(), max_size=4),
    NOT_CALLABLE,
    st.data(),
)
def test_predicate_combinators_name_the_bad_member(
    func: str, members: list[bool], bad: Any, data: Any
) -> None:
    combinator = getattr(ll, func)
    predicates: list[Any] = [ll.early_stopping("loss") if m else ll.never for m in members]
    if not predicates:
        with pytest.raises(ValueError) as info:
            combinator()
        assert_looplib_message(info, func, "predicates")
        return
    combinator(*predicates)([{"epoch": 0, "loss": 1.0}])  # valid: builds and runs
    i = data.draw(st.integers(0, len(predicates)))
    predicates.insert(i, bad)
    with pytest.raises(TypeError) as info:
        combinator(*predicates)
    assert_looplib_message(info, func, f"predicates[{i}]")


TRANSFORMERS = [ll.accumulate(2), ll.clip(1.0), ll.track_norm(), ll.skip_nonfinite()]


@given(
    st.lists(st.sampled_from(range(4)), unique=True),
    st.sampled_from([ll.clip, 3, "clip", None, mse]),
    st.data(),
)
def test_chain_names_what_is_not_a_transformer(indices: list[int], bad: Any, data: Any) -> None:
    parts: list[Any] = [TRANSFORMERS[i] for i in indices]
    i = data.draw(st.integers(0, len(parts)))
    parts.insert(i, bad)
    with pytest.raises(TypeError) as info:
        ll.chain(*parts)
    assert_looplib_message(info, "chain", f"transformers[{i}]")


# --------------------------------------------------------------------------------- fit arguments
def _fit_fix(kwargs: dict) -> dict:
    kwargs["max_epochs"] = max(kwargs.get("max_epochs", 2), kwargs.get("min_epochs", 0))
    return kwargs


FIT: Table = {
    "fit": (
        ll.fit,
        {
            "min_epochs": (st.integers(0, 2), BAD_NONNEGATIVE_INT),
            "max_epochs": (st.integers(1, 2), BAD_POSITIVE_INT),
            "max_steps": (
                st.one_of(st.none(), st.integers(1, 5)),
                BAD_POSITIVE_INT.filter(lambda p: p[0] is not None),
            ),
            "train_fraction": (st.floats(0.01, 1.0), bad_fraction(low_open=True)),
            "overfit_fraction": (st.floats(0.0, 1.0), bad_fraction(low_open=False)),
            "progress": (
                st.sampled_from([False, None]),
                st.tuples(st.sampled_from([0, 1, "True", 1.0]), st.just(TypeError)),
            ),
            "check_finite": (st.booleans(), BAD_BOOL),
            "resume": (st.booleans(), BAD_BOOL),
            "shard": (st.booleans(), BAD_BOOL),
            "stop": (
                st.sampled_from([None, ll.never, ll.early_stopping("loss")]),
                st.tuples(st.sampled_from([3, "loss"]), st.just(TypeError)),
            ),
            "log_every": (st.integers(1, 3), BAD_POSITIVE_INT),
            "on_step": (st.just(None), st.tuples(st.sampled_from([5, "f"]), st.just(TypeError))),
            "on_epoch_end": (
                st.just(None),
                st.tuples(st.sampled_from([5, "f"]), st.just(TypeError)),
            ),
            "validate_with": (
                st.just("params"),
                st.tuples(st.sampled_from(["weights", "EMA", "ema"]), st.just(ValueError)),
            ),
            "checkpoints": (
                st.just(None),
                st.tuples(st.sampled_from(["dir", 3, {"directory": "d"}]), st.just(TypeError)),
            ),
            "loggers": (
                st.just([]),
                st.tuples(st.sampled_from(["log.csv", 3, None]), st.just(TypeError)),
            ),
        },
        _fit_fix,
    )
}


@given(configurations(FIT))
def test_fit_rejects_bad_arguments_by_name(config: tuple) -> None:
    _, kwargs, arg, exc = config
    model = nn.Linear(2, 1)
    opt = ll.optim.sgd(0.1)
    step = ll.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), opt)
    batches = [(torch.randn(3, 2), torch.randn(3, 1)) for _ in range(3)]
    kwargs.setdefault("progress", False)
    if arg is None:
        result = ll.fit(step, ll.init(model, opt), batches, **kwargs)
        assert 1 <= len(result.history) <= 2
        return
    with pytest.raises(exc) as info:
        ll.fit(step, ll.init(model, opt), batches, **kwargs)
    assert_looplib_message(info, "fit", arg)


def _pair_monitor_and_mode(kwargs: dict) -> dict:
    if "monitor" in kwargs or "mode" in kwargs:
        kwargs.setdefault("monitor", "val_loss")
        kwargs.setdefault("mode", "min")
    return kwargs


CHECKPOINTS: Table = {
    "Checkpoints": (
        ll.Checkpoints,
        {
            "directory": (
                st.just("runs/a"),
                st.tuples(st.sampled_from([3, None]), st.just(TypeError)),
            ),
            "every_batches": (
                st.one_of(st.none(), st.integers(1, 3)),
                BAD_POSITIVE_INT.filter(lambda p: p[0] is not None),
            ),
            "every_epochs": (st.integers(1, 3), BAD_POSITIVE_INT),
            "keep_last": (st.integers(1, 3), BAD_POSITIVE_INT),
            "keep_best": (st.integers(0, 2), BAD_NONNEGATIVE_INT),
            "monitor": (
                st.just("val_loss"),
                st.tuples(st.sampled_from([3, b"x"]), st.just(TypeError)),
            ),
            "mode": (
                st.sampled_from(["min", "max"]),
                st.one_of(
                    st.tuples(st.sampled_from([3, True, 3j, ["min"]]), st.just(TypeError)),
                    st.tuples(st.sampled_from(["auto", "MIN", ""]), st.just(ValueError)),
                ),
            ),
        },
        _pair_monitor_and_mode,
    )
}


@given(configurations(CHECKPOINTS))
def test_checkpoints_reject_bad_settings_by_name_without_a_run(config: tuple) -> None:
    """Every setting is checked where the value is made, directory or not (nothing is written)."""
    _, kwargs, arg, exc = config
    kwargs = _pair_monitor_and_mode(kwargs)
    if arg is None:
        made = ll.Checkpoints(**kwargs)
        assert made.keep_last == kwargs.get("keep_last", 3)
        return
    with pytest.raises(exc) as info:
        ll.Checkpoints(**kwargs)
    assert_looplib_message(info, "Checkpoints", arg)


def test_checkpoints_monitor_and_mode_come_together() -> None:
    with pytest.raises(ValueError, match=r"^Checkpoints\(mode=None\): mode must be 'min' or 'max'"):
        ll.Checkpoints("d", monitor="val_loss")
    with pytest.raises(ValueError, match=r"^Checkpoints\(mode='min'\): mode must be None without"):
        ll.Checkpoints("d", mode="min")
    with pytest.raises(ValueError, match=r"^fit\(mode=None\): mode must be 'min' or 'max'"):
        model = nn.Linear(2, 1)
        step = ll.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), ll.optim.sgd(0.1))
        ll.fit(step, ll.init(model, ll.optim.sgd(0.1)), [], monitor="val_loss")


def test_helpers_validate_their_arguments() -> None:
    with pytest.raises(ValueError, match=re.escape("batches_used(n=-5): n must be a non-negative")):
        ll.batches_used(-5, 0.5)
    with pytest.raises(ValueError, match=re.escape("batches_used(fraction=1.5): fraction must")):
        ll.batches_used(5, 1.5)
    with pytest.raises(TypeError, match=re.escape("batches_used(fraction='x'): fraction must")):
        ll.batches_used(5, "x")
    model = nn.Linear(2, 1)
    step = ll.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), ll.optim.sgd(0.1))
    with pytest.raises(TypeError, match=re.escape("evaluate(state=5): state must be a looplib")):
        ll.evaluate(step, 5, [])
    with pytest.raises(TypeError, match=re.escape("evaluate(batches=5): batches must be an")):
        ll.evaluate(step, ll.init(model, ll.optim.sgd(0.1)), 5)
    with pytest.raises(TypeError, match=re.escape("epoch(after=5): after must be a function")):
        ll.epoch(step, ll.init(model, ll.optim.sgd(0.1)), [], after=5)


def test_min_epochs_above_max_epochs_names_min_epochs() -> None:
    model = nn.Linear(2, 1)
    opt = ll.optim.sgd(0.1)
    step = ll.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), opt)
    with pytest.raises(ValueError) as info:
        ll.fit(
            step,
            ll.init(model, opt),
            [(torch.zeros(1, 2), torch.zeros(1, 1))],
            min_epochs=3,
            max_epochs=2,
        )
    assert_looplib_message(info, "fit", "min_epochs")
    assert "must be <= max_epochs=2" in str(info.value)


# ------------------------------------------------------------------ a step that changes structure
def _paths(tree: Any, prefix: str = "state") -> list[tuple[str, tuple[Any, ...]]]:
    """Readable paths and key paths of the tensor leaves (an oracle written apart from looplib's:
    NamedTuple fields as ``.name``, dict keys as ``[key]``)."""
    out: list[tuple[str, tuple[Any, ...]]] = []

    def walk(node: Any, text: str, keys: tuple[Any, ...]) -> None:
        if isinstance(node, torch.Tensor):
            out.append((text, keys))
        elif isinstance(node, tuple) and hasattr(node, "_fields"):
            for name in node._fields:
                walk(getattr(node, name), f"{text}.{name}", (*keys, name))
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{text}[{key!r}]", (*keys, key))

    walk(tree, prefix, ())
    return out


def _replace(node: Any, keys: tuple[Any, ...], change: Callable[[Any], Any]) -> Any:
    if not keys:
        return change(node)
    head, rest = keys[0], keys[1:]
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return node._replace(**{head: _replace(getattr(node, head), rest, change)})
    new = dict(node)
    if not rest and change is _drop:
        del new[head]
    else:
        new[head] = _replace(node[head], rest, change)
    return new


def _drop(x: Any) -> Any:  # a marker: delete the dict entry
    raise AssertionError


CHANGES: dict[str, tuple[Callable[[torch.Tensor], Any], str]] = {
    "dtype": (
        lambda t: t.to(torch.float32 if t.dtype != torch.float32 else torch.float64),
        "changed from Tensor(shape={shape}, dtype={dtype}) to Tensor(",
    ),
    "shape": (lambda t: t.unsqueeze(0), "changed from Tensor(shape={shape}, dtype={dtype})"),
    "number": (lambda t: 0, "changed from Tensor(shape={shape}, dtype={dtype}) to int"),
    "drop": (_drop, "is missing from the output (it was Tensor(shape={shape}, dtype={dtype}))"),
}


@given(st.data(), st.sampled_from(sorted(CHANGES)))
def test_a_structure_change_anywhere_is_named_by_its_path(data: Any, kind: str) -> None:
    model = mlp(batchnorm=True)
    opt = ll.optim.adam(0.01)
    chain = [ll.skip_nonfinite(), ll.accumulate(1), ll.track_norm()]
    probe = ll.chain(*chain)(ll.train_step(model, mse, opt))
    state = probe(ll.init(model, opt, seed=1), regression_batch(4))
    # Every tensor of the state, metrics and the random key included: the structure is
    # complete before the first update, and the step advances the key before the stages run.
    candidates = [
        (text, keys)
        for text, keys in _paths(state)
        if kind != "drop" or isinstance(_parent(state, keys), dict)
    ]
    assert any(keys[:1] == ("metrics",) for _, keys in candidates)
    assert any(keys[:2] == ("slots", "rng") for _, keys in candidates)
    text, keys = data.draw(st.sampled_from(candidates))
    leaf = _leaf(state, keys)
    change, expected = CHANGES[kind]

    def wrap(inner: Callable[..., ll.TrainState]) -> Callable[..., ll.TrainState]:
        def apply(s: ll.TrainState, micro: Micro) -> ll.TrainState:
            return _replace(inner(s, micro), keys, change)

        return apply

    breaker = stage_transformer(Stage("breaker", wrap))
    step = ll.chain(*chain, breaker)(ll.train_step(model, mse, opt))
    with pytest.raises(ValueError) as info:
        step(state, regression_batch(4, seed=1))
    message = str(info.value)
    where = f"{text} " + expected.format(shape=tuple(leaf.shape), dtype=leaf.dtype)
    assert message.startswith(f"{step!r}: {where}"), message
    assert message.endswith(
        "check the transformer, optimizer or loss function that writes this entry."
    ), message


def _leaf(tree: Any, keys: tuple[Any, ...]) -> Any:
    for key in keys:
        tree = (
            getattr(tree, key) if isinstance(key, str) and hasattr(tree, "_fields") else tree[key]
        )
    return tree


def _parent(tree: Any, keys: tuple[Any, ...]) -> Any:
    return _leaf(tree, keys[:-1])


# ----------------------------------------------------------------------- bad batches inside fit
def _fit_setup(loss: Callable[..., Any] | None = None):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    opt = ll.optim.sgd(0.1)
    step = ll.train_step(model, loss or (lambda m, b: F.mse_loss(m(b[0]), b[1])), opt)
    return step, ll.init(model, opt)


def _good(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 4), torch.randn(n, 1)


BAD_BATCHES = {
    "too many features": (
        (torch.randn(5, 7), torch.randn(5, 1)),
        RuntimeError,
        "(Tensor(shape=(5, 7), dtype=torch.float32), Tensor(shape=(5, 1), dtype=torch.float32))",
    ),
    "wrong dtype": (
        (torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)),
        RuntimeError,
        "(Tensor(shape=(5, 4), dtype=torch.float64), Tensor(shape=(5, 1), dtype=torch.float64))",
    ),
    "a dict instead of a tuple": (
        {"x": torch.randn(5, 4), "y": torch.randn(5, 1)},
        KeyError,
        "{'x': Tensor(shape=(5, 4), dtype=torch.float32), 'y': Tensor(shape=(5, 1), dtype=torch.float32)}",
    ),
    "a list of one tensor": (
        [torch.randn(5, 4)],
        IndexError,
        "[Tensor(shape=(5, 4), dtype=torch.float32)]",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_BATCHES))
@given(epochs=st.integers(1, 3), position=st.integers(0, 3))
def test_a_bad_batch_keeps_its_error_and_gets_a_note(name: str, epochs: int, position: int) -> None:
    bad, exc, shown = BAD_BATCHES[name]
    step, state = _fit_setup()
    good = [_good() for _ in range(4)]

    def batches(epoch: int) -> list[Any]:
        if epoch < epochs - 1:
            return good
        return [*good[:position], bad, *good[position:]]

    with pytest.raises(exc) as info:
        ll.fit(step, state, batches, max_epochs=epochs, progress=False)
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1, notes
    first = (
        ""
        if epochs == 1 and position == 0
        else (
            "; the first batch of this run (epoch 0, batch 0) was "
            "(Tensor(shape=(5, 4), dtype=torch.float32), Tensor(shape=(5, 1), dtype=torch.float32))"
        )
    )
    assert (
        notes[0] == f"fit: while training on epoch {epochs - 1}, batch {position}: {shown}{first}."
    )
    # The original error is intact: its type, message and traceback into the loss.
    frames = [f.name for f in traceback.extract_tb(info.tb)]
    assert "<lambda>" in frames


def test_a_bad_validation_batch_gets_a_note_too() -> None:
    step, state = _fit_setup()
    val = [_good(), (torch.randn(2, 9), torch.randn(2, 1))]
    with pytest.raises(RuntimeError) as info:
        ll.fit(step, state, [_good()], val=val, max_epochs=1, progress=False)
    assert info.value.__notes__ == [
        "evaluate: while evaluating batch 1: "
        "(Tensor(shape=(2, 9), dtype=torch.float32), Tensor(shape=(2, 1), dtype=torch.float32))"
    ]


def test_looplib_errors_from_the_step_keep_their_message_and_get_the_note() -> None:
    """A loss returning a non-scalar raises looplib's own TypeError; fit adds where it was."""
    step, state = _fit_setup(lambda m, b: (m(b[0]) - b[1]).pow(2))
    with pytest.raises(TypeError, match=r"^train_step\(loss_fn=Tensor\(shape=\(5, 1\)") as info:
        ll.fit(step, state, [_good()], max_epochs=1, progress=False)
    assert info.value.__notes__[0].startswith("fit: while training on epoch 0, batch 0: (Tensor(")


def test_keyboard_interrupt_gets_no_note() -> None:
    def loss(m: nn.Module, b: Any) -> torch.Tensor:
        raise KeyboardInterrupt

    step, state = _fit_setup(loss)
    with pytest.raises(KeyboardInterrupt) as info:
        ll.fit(step, state, [_good()], max_epochs=1, progress=False)
    assert not getattr(info.value, "__notes__", None)


def test_long_batches_are_summarised() -> None:
    from looplib._epoch import layout

    seqs = [torch.zeros(i + 1) for i in range(40)]
    text = layout((seqs, torch.zeros(40, dtype=torch.int64)))
    assert text.startswith("([Tensor(shape=(1,), dtype=torch.float32), ")
    assert "... (40 items)]" in text and len(text) < 400
    assert layout(("a", 3, None)) == "('a', 3, None)"
    assert layout((torch.zeros(2),)) == "(Tensor(shape=(2,), dtype=torch.float32),)"
