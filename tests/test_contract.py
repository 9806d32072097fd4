"""The contract every transformer satisfies, checked for all of them with the same laws:

* the step never changes its input (no tensor of the state changes value or is written in
  place), with BatchNorm in train mode and Dropout in the model;
* ``step.init(state, batch)`` completes the structure: every output (every call, ``fold``,
  ``flush``) has exactly its treespec, shapes and dtypes, metrics and slots included;
* ``fold`` equals the per-call loop bit for bit, and never writes into the caller's state;
* the same state gives the same result (randomness is keyed by the state), and the global
  generator is never touched;
* applying a transformer builds a new step and leaves the old one alone;
* bad arguments raise at construction with ``func(arg=value): arg <rule>, got <value>.``;
* a stage that breaks the structure is caught, and the error names the path.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import looplib as ll
from looplib._step import Micro, Stage
from looplib._transform import stage_transformer
from tests.helpers import (
    assert_pure,
    assert_same_structure,
    assert_snapshot_unchanged,
    assert_trees_equal,
    mlp,
    mse,
    regression_batch,
    regression_batches,
    sequence_batch,
    sequence_loss,
    sequence_model,
    snapshot,
)

TRANSFORMERS = {
    "accumulate(1)": lambda: ll.accumulate(1),
    "accumulate(3)": lambda: ll.accumulate(3),
    "accumulate-drop": lambda: ll.accumulate(2, partial="drop"),
    "accumulate-carry": lambda: ll.accumulate(2, partial="carry"),
    "clip": lambda: ll.clip(0.05),
    "clip(inf)": lambda: ll.clip(math.inf),
    "clip-l1": lambda: ll.clip(0.5, 1),
    "clip-linf": lambda: ll.clip(0.5, "inf"),
    "track_norm": lambda: ll.track_norm(2),
    "track_norm-inf-total": lambda: ll.track_norm("inf", per_param=False),
    "skip_nonfinite": lambda: ll.skip_nonfinite(2),
    "tbptt_split(2)": lambda: ll.tbptt_split(2),
    "tbptt_split(100)": lambda: ll.tbptt_split(100),
    "chain()": lambda: ll.chain(),
    "chain-all": lambda: ll.chain(
        ll.tbptt_split(3), ll.skip_nonfinite(), ll.accumulate(2), ll.track_norm(2), ll.clip(0.1)
    ),
    "chain-clip-first": lambda: ll.chain(ll.clip(0.1), ll.track_norm(1), ll.accumulate(2)),
}

OPTIMIZERS = {
    "sgd": lambda: ll.optim.sgd(0.1, momentum=0.9),
    "adam": lambda: ll.optim.adam(0.01),
}


def run_contract(step: ll.Step, state: ll.TrainState, batches: list) -> ll.TrainState:
    """``step.init`` is pure and completes the structure; every call is pure and keeps that
    structure; so does ``flush``; ``fold`` equals the calls bit for bit and leaves its input
    alone; nothing touches the global generator."""
    global_rng = torch.random.get_rng_state()
    reference = assert_pure(step.init, state, batches[0])
    assert_trees_equal(step.init(reference), reference)  # idempotent
    start = state
    for batch in batches:
        new = assert_pure(step, state, batch)
        assert_same_structure(new, reference)
        state = new
    snap = snapshot(start)
    folded = ll.fold(step, start, batches)
    assert_snapshot_unchanged(snap)
    assert_trees_equal(folded, state)
    flushed = assert_pure(lambda s, _: step.flush(s), state, None)
    assert_same_structure(flushed, reference)
    assert torch.equal(torch.random.get_rng_state(), global_rng)
    return flushed


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_purity_and_structure(name: str, opt_name: str, dtype: torch.dtype) -> None:
    model = sequence_model(dtype=dtype)
    opt = OPTIMIZERS[opt_name]()
    step = TRANSFORMERS[name]()(ll.train_step(model, sequence_loss, opt))
    batches = [sequence_batch(t=5, seed=i, dtype=dtype) for i in range(5)]
    state = run_contract(step, ll.init(model, opt), batches)
    assert all(p.dtype == dtype for p in state.params.values())
    assert all(torch.isfinite(p).all() for p in state.params.values())


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_applying_a_transformer_leaves_the_step_alone(name: str) -> None:
    model = sequence_model()
    opt = ll.optim.sgd(0.1)
    base = ll.train_step(model, sequence_loss, opt)
    before = (repr(base), base.stages, base.split)
    wrapped = TRANSFORMERS[name]()(base)
    assert isinstance(wrapped, ll.Step)
    assert (repr(base), base.stages, base.split) == before


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_the_same_state_and_seed_give_the_same_result(name: str) -> None:
    model = sequence_model()
    opt = ll.optim.adam(0.05)
    step = TRANSFORMERS[name]()(ll.train_step(model, sequence_loss, opt))
    batches = [sequence_batch(t=4, seed=i) for i in range(3)]
    a = ll.fold(step, ll.init(model, opt, seed=3), batches)
    torch.manual_seed(99)  # the global generator plays no part
    b = ll.fold(step, ll.init(model, opt, seed=3), batches)
    assert_trees_equal(a, b)
    start = ll.init(model, opt)
    assert_trees_equal(ll.fold(step, start, batches), ll.fold(step, start, batches))


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_a_transformer_applies_only_to_a_step(name: str) -> None:
    transformer = TRANSFORMERS[name]()
    with pytest.raises(
        TypeError,
        match=rf"^{re.escape(repr(transformer))}\(step=<function mse .*\): step must be a "
        r"looplib Step \(from ll.train_step or another transformer\), got <function mse",
    ):
        transformer(mse)


# --------------------------------------------------------------------------- random chains

GRADIENT_TRANSFORMERS = {
    "accumulate": lambda draw: ll.accumulate(
        draw(st.integers(1, 3)), partial=draw(st.sampled_from(["step", "drop", "carry"]))
    ),
    "clip": lambda draw: ll.clip(
        draw(st.sampled_from([1e-3, 0.1, math.inf])), draw(st.sampled_from([1, 2, "inf"]))
    ),
    "track_norm": lambda draw: ll.track_norm(
        draw(st.sampled_from([1, 2, "inf"])), per_param=draw(st.booleans())
    ),
    "skip_nonfinite": lambda draw: ll.skip_nonfinite(draw(st.integers(0, 3))),
}
STATEFUL = {"accumulate", "skip_nonfinite"}


@st.composite
def chains(draw) -> ll.Transformer:
    names = draw(
        st.lists(st.sampled_from(sorted(GRADIENT_TRANSFORMERS)), max_size=5).filter(
            lambda ns: all(ns.count(s) <= 1 for s in STATEFUL)
        )
    )
    parts = [GRADIENT_TRANSFORMERS[n](draw) for n in names]
    if draw(st.booleans()):
        parts.insert(0, ll.tbptt_split(draw(st.integers(1, 6))))
    return ll.chain(*parts)


@given(
    transformer=chains(),
    n_batches=st.integers(1, 5),
    t=st.integers(1, 6),
    adam=st.booleans(),
    seed=st.integers(0, 2**16),
    rng_in_state=st.booleans(),
)
def test_no_random_chain_mutates_its_input(
    transformer, n_batches, t, adam, seed, rng_in_state
) -> None:
    model = sequence_model(seed=seed % 3)
    opt = ll.optim.adam(0.05) if adam else ll.optim.sgd(0.1, momentum=0.9)
    step = transformer(ll.train_step(model, sequence_loss, opt))
    batches = [sequence_batch(b=3, t=t, seed=seed + i) for i in range(n_batches)]
    state = ll.init(model, opt, seed=seed if rng_in_state else None)
    run_contract(step, state, batches)


# --------------------------------------------------------------------------- chain


def test_chain_of_nothing_is_the_identity() -> None:
    model = sequence_model()
    opt = ll.optim.sgd(0.1)
    base = ll.train_step(model, sequence_loss, opt)
    batches = [sequence_batch(seed=i) for i in range(3)]
    start = ll.init(model, opt)
    want = ll.fold(base, start, batches)
    got = ll.fold(ll.chain()(base), start, batches)
    assert_trees_equal(got, want)
    assert repr(ll.chain()) == "chain()"


def test_chain_is_associative() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)
    base = ll.train_step(model, mse, opt)
    a, b, c = ll.accumulate(2), ll.track_norm(2), ll.clip(0.01)
    flat = ll.chain(a, b, c)(base)
    left = ll.chain(ll.chain(a, b), c)(base)
    right = ll.chain(a, ll.chain(b, c))(base)
    nested = a(b(c(base)))
    assert repr(flat) == repr(left) == repr(right) == repr(nested)
    batches = regression_batches([3, 4, 5, 6])
    start = ll.init(model, opt)
    want = ll.fold(flat, start, batches)
    for other in (left, right, nested):
        assert_trees_equal(ll.fold(other, start, batches), want)


@pytest.mark.parametrize(
    ("bad", "shown"),
    [("clip", "'clip'"), (ll.clip, "<function clip at 0x"), (None, "None")],
)
def test_chain_rejects_what_is_not_a_transformer(bad, shown: str) -> None:
    with pytest.raises(
        TypeError,
        match=r"^chain\(transformers\[1\]="
        + re.escape(shown)
        + r".*\): transformers\[1\] must be a looplib transformer such as ll.clip\(1.0\), got ",
    ):
        ll.chain(ll.accumulate(2), bad)


# --------------------------------------------------------------------------- construction errors

CONSTRUCTION_ERRORS = [
    (ll.accumulate, {"k": 0}, ValueError, "accumulate(k=0): k must be a positive int, got 0."),
    (ll.accumulate, {"k": 1.0}, TypeError, "accumulate(k=1.0): k must be a positive int"),
    (
        ll.accumulate,
        {"k": 2, "partial": "STEP"},
        ValueError,
        "accumulate(partial='STEP'): partial must be one of",
    ),
    (ll.clip, {"max_norm": -1}, ValueError, "clip(max_norm=-1): max_norm must be a positive"),
    (ll.clip, {"max_norm": "1"}, TypeError, "clip(max_norm='1'): max_norm must be a positive"),
    (
        ll.clip,
        {"max_norm": 1, "norm_type": 0.0},
        ValueError,
        "clip(norm_type=0.0): norm_type must be a positive",
    ),
    (ll.track_norm, {"norm_type": -1}, ValueError, "track_norm(norm_type=-1): norm_type must"),
    (ll.track_norm, {"norm_type": [2]}, TypeError, "track_norm(norm_type=[2]): norm_type must"),
    (ll.track_norm, {"per_param": "yes"}, TypeError, "track_norm(per_param='yes'): per_param"),
    (ll.tbptt_split, {"steps": 0}, ValueError, "tbptt_split(steps=0): steps must be a positive"),
    (ll.tbptt_split, {"steps": "8"}, TypeError, "tbptt_split(steps='8'): steps must be a positive"),
    (ll.tbptt_split, {"steps": 8, "split": 1}, TypeError, "tbptt_split(split=1): split must be"),
    (
        ll.skip_nonfinite,
        {"max_consecutive": -1},
        ValueError,
        "skip_nonfinite(max_consecutive=-1): max_consecutive must be a non-negative int",
    ),
    (
        ll.skip_nonfinite,
        {"max_consecutive": 0.5},
        TypeError,
        "skip_nonfinite(max_consecutive=0.5): max_consecutive must be a non-negative int",
    ),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "exc", "message"),
    CONSTRUCTION_ERRORS,
    ids=[f"{f.__name__}-{sorted(k.items())}" for f, k, _, _ in CONSTRUCTION_ERRORS],
)
def test_bad_arguments_raise_at_construction(factory, kwargs, exc, message: str) -> None:
    with pytest.raises(exc, match="^" + re.escape(message)) as info:
        factory(**kwargs)
    value = list(kwargs.values())[-1]
    assert f", got {value!r}." in str(info.value)


# --------------------------------------------------------------------------- structure errors


def custom_stage(name: str, change) -> ll.Transformer:
    """A gradient stage that runs the rest of the chain, then edits the resulting state."""

    def wrap(inner):
        def apply(state: ll.TrainState, micro: Micro) -> ll.TrainState:
            return change(inner(state, micro))

        return apply

    return stage_transformer(Stage(name, wrap))


def _params(state, **changes):
    params = dict(state.params)
    for key, value in changes.items():
        if value is None:
            del params[key]
        else:
            params[key] = value(params[key])
    return state._replace(params=params)


STRUCTURE_ERRORS = {
    "dtype": (
        lambda s: s._replace(params={**s.params, "0.weight": s.params["0.weight"].float()}),
        "state.params['0.weight'] changed from Tensor(shape=(6, 4), dtype=torch.float64) "
        "to Tensor(shape=(6, 4), dtype=torch.float32)",
    ),
    "dropped key": (
        lambda s: s._replace(params={k: v for k, v in s.params.items() if k != "0.bias"}),
        "state.params['0.bias'] is missing from the output (it was Tensor(shape=(6,), "
        "dtype=torch.float64))",
    ),
    "shape": (
        lambda s: s._replace(params={**s.params, "2.bias": s.params["2.bias"].reshape(1, 1)}),
        "state.params['2.bias'] changed from Tensor(shape=(1,), dtype=torch.float64) to "
        "Tensor(shape=(1, 1), dtype=torch.float64)",
    ),
    "new slot": (
        lambda s: s._replace(slots={**s.slots, "mine": torch.zeros(())}),
        "state.slots['mine'] appeared in the output (Tensor(shape=(), dtype=torch.float32)) but "
        "was not in the input",
    ),
    "step dtype": (
        lambda s: s._replace(step=s.step.float()),
        "state.step changed from Tensor(shape=(), dtype=torch.int64) to "
        "Tensor(shape=(), dtype=torch.float32)",
    ),
    "tensor to number": (
        lambda s: s._replace(step=int(s.step)),
        "state.step changed from Tensor(shape=(), dtype=torch.int64) to int",
    ),
}


@pytest.mark.parametrize("kind", sorted(STRUCTURE_ERRORS))
@pytest.mark.parametrize("driver", ["call", "fold"])
def test_a_stage_that_breaks_the_structure_is_named(driver: str, kind: str) -> None:
    """The same error from a lone call and from fold (which runs whole windows)."""
    change, where = STRUCTURE_ERRORS[kind]
    model = mlp()
    opt = ll.optim.sgd(0.1)
    step = ll.chain(ll.track_norm(2), custom_stage("breaker", change))(
        ll.train_step(model, mse, opt)
    )
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            f"chain(track_norm(2.0), breaker)(train_step(Sequential, mse)): {where}. A step must "
            "return a state with exactly the structure, shapes and dtypes it received; check the "
            "transformer, optimizer or loss function that writes this entry."
        )
        + "$",
    ):
        if driver == "call":
            step(ll.init(model, opt), regression_batch(3))
        else:
            ll.fold(step, ll.init(model, opt), regression_batches([3, 3]))


def test_a_change_on_a_later_call_is_caught_too() -> None:
    """Under accumulate(2) a lone call computes both the held and the applied window and
    selects: an optimizer that returns float32 params for float64 ones is caught on the first
    call already (torch.where would promote silently), and fold catches it on the first window,
    naming the path either way."""
    base = ll.optim.sgd(0.1)

    def update(grads, opt_state, params):
        params, opt_state = base.update(grads, opt_state, params)
        return {k: p.float() for k, p in params.items()}, opt_state

    opt = ll.Optimizer(base.init, update)
    model = mlp()
    step = ll.accumulate(2)(ll.train_step(model, mse, opt))
    message = re.escape(
        "chain(accumulate(2))(train_step(Sequential, mse)): state.params['0.weight'] changed "
        "from Tensor(shape=(6, 4), dtype=torch.float64) to Tensor(shape=(6, 4), "
        "dtype=torch.float32)."
    )
    with pytest.raises(ValueError, match=message):
        step(ll.init(model, opt), regression_batch(3))
    with pytest.raises(ValueError, match=message):
        ll.fold(step, ll.init(model, opt), [regression_batch(3)] * 2)


def test_a_state_of_another_dtype_is_refused_by_a_step_that_saw_another() -> None:
    """The input is checked against the states the step has seen: a step that ran float64
    states refuses a float32 one, naming the path; a step of its own takes it."""
    model = mlp()
    opt = ll.optim.sgd(0.1)
    step = ll.clip(1.0)(ll.train_step(model, mse, opt))
    step(ll.init(model, opt), regression_batch(3))
    model32 = mlp(dtype=torch.float32)
    state32 = ll.init(model32, opt)
    batch32 = regression_batch(3, dtype=torch.float32)
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "step(state=...): state.params['0.weight'] changed from Tensor(shape=(6, 4), "
            "dtype=torch.float64) to Tensor(shape=(6, 4), dtype=torch.float32). A "
            "step must return a state with exactly the structure, shapes and dtypes it received; "
            "check the transformer, optimizer or loss function that writes this entry."
        )
        + "$",
    ):
        step(step.init(state32, batch32), batch32)
    own = ll.clip(1.0)(ll.train_step(model32, mse, opt))
    state = own(state32, batch32)
    assert state.params["0.weight"].dtype == torch.float32
