"""The optimizers beyond SGD/Adam against torch.optim, and the laws every optimizer obeys.

Oracles: 100-step float64 trajectories against ``torch.optim`` (every optimizer and option, over
hypothesis-drawn hyperparameters), Lion against a hand-written loop of the paper's pseudo-code.
Laws (a conformance suite over every optimizer): ``update`` is pure, ``update_`` is ``update``
to the bit, a vmapped update over stacked members is the members' separate updates, a compiled
update (fullgraph) is the eager one, ``hyperparams`` reports the last update's lr.
"""

from __future__ import annotations

import re

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import looplib.optim as lo
from looplib import _ops as ops
from tests.test_optim import (
    assert_trajectories_close,
    make_grads,
    make_params,
    run_ours,
    run_torch,
)

STEPS = 100
fast = settings(max_examples=6, deadline=None, derandomize=True)

# --------------------------------------------------------------------------- oracles


def _betas(draw, low2=0.9):
    return (draw(st.floats(0.0, 0.99)), draw(st.floats(low2, 0.9999)))


@st.composite
def cases(draw):
    """(looplib factory name, kwargs, torch class, torch kwargs) over every optimizer/option."""
    kind = draw(
        st.sampled_from(
            ["sgd", "adam", "adamw", "adamax", "nadam", "radam", "rmsprop", "adagrad", "adafactor"]
        )
    )
    maximize = draw(st.booleans())
    wd = draw(st.sampled_from([0.0, 1e-3, 0.1]))
    lr = draw(st.floats(1e-4, 0.05))
    eps = draw(st.sampled_from([1e-8, 1e-3]))
    if kind == "sgd":
        nesterov = draw(st.booleans())
        kw = dict(
            lr=lr,
            momentum=draw(st.floats(0.1, 0.95)) if nesterov else draw(st.sampled_from([0, 0.9])),
            dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.3])),
            weight_decay=wd,
            nesterov=nesterov,
        )
        cls = torch.optim.SGD
    elif kind in ("adam", "adamw"):
        kw = dict(lr=lr, betas=_betas(draw), eps=eps, weight_decay=wd, amsgrad=draw(st.booleans()))
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    elif kind == "adamax":
        kw = dict(lr=lr, betas=_betas(draw, 0.5), eps=eps, weight_decay=wd)
        cls = torch.optim.Adamax
    elif kind == "nadam":
        kw = dict(
            lr=lr,
            betas=_betas(draw),
            eps=eps,
            weight_decay=wd,
            momentum_decay=draw(st.sampled_from([4e-3, 0.1])),
            decoupled_weight_decay=draw(st.booleans()),
        )
        cls = torch.optim.NAdam
    elif kind == "radam":
        kw = dict(
            lr=lr,
            betas=_betas(draw),
            eps=eps,
            weight_decay=wd,
            decoupled_weight_decay=draw(st.booleans()),
        )
        cls = torch.optim.RAdam
    elif kind == "rmsprop":
        kw = dict(
            lr=lr,
            alpha=draw(st.floats(0.5, 0.999)),
            eps=eps,
            weight_decay=wd,
            momentum=draw(st.sampled_from([0.0, 0.5, 0.9])),
            centered=draw(st.booleans()),
        )
        cls = torch.optim.RMSprop
    elif kind == "adagrad":
        kw = dict(
            lr=draw(st.floats(1e-3, 0.5)),
            lr_decay=draw(st.sampled_from([0.0, 0.01])),
            weight_decay=wd,
            initial_accumulator_value=draw(st.sampled_from([0.0, 0.1])),
            eps=draw(st.sampled_from([1e-10, 1e-3])),
        )
        cls = torch.optim.Adagrad
    else:
        kw = dict(
            lr=draw(st.floats(1e-3, 0.5)),
            beta2_decay=draw(st.floats(-1.0, -0.3)),
            eps=(draw(st.sampled_from([None, 1e-30, 1e-10])), draw(st.sampled_from([1e-3, 1e-2]))),
            d=draw(st.sampled_from([1.0, 2.0])),
            weight_decay=wd,
        )
        cls = torch.optim.Adafactor
    return kind, dict(kw, maximize=maximize), cls


@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=cases(), seed=st.integers(0, 2**16), foreach=st.booleans())
def test_every_optimizer_matches_torch(case, seed, foreach):
    kind, kw, cls = case
    params, grads = make_params(seed), make_grads(seed, STEPS)
    ours, state = run_ours(getattr(lo, kind)(**kw), params, grads)
    theirs = run_torch(lambda ps: cls(ps, foreach=foreach, **kw), params, grads)
    assert_trajectories_close(ours, theirs)
    assert int(state.count) == STEPS


# Measured against torch.optim's foreach implementation: these agree to the last bit over 100
# float64 steps (the single-tensor paths differ by up to ~1e-15 for NAdam, RAdam, Adafactor).
BITWISE = [
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True)),
    ("adamw", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("adamax", dict(lr=0.01, weight_decay=0.1, maximize=True)),
    ("nadam", dict(lr=0.01, weight_decay=0.1)),
    ("nadam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ("radam", dict(lr=0.01, weight_decay=0.1)),
    ("radam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("rmsprop", dict(lr=0.01, weight_decay=0.1)),
    ("rmsprop", dict(lr=0.01, momentum=0.9, centered=True, maximize=True)),
    ("adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1)),
    ("adafactor", dict(lr=0.01)),
    ("adafactor", dict(lr=0.5, weight_decay=0.1, d=1.5, eps=(1e-20, 1e-3), beta2_decay=-0.5)),
]
TORCH = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "adafactor": torch.optim.Adafactor,
}


@pytest.mark.parametrize(
    ("kind", "kw"), BITWISE, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BITWISE)]
)
def test_bitwise_equal_to_torch_foreach(kind, kw):
    params, grads = make_params(0), make_grads(0, STEPS)
    ours, _ = run_ours(getattr(lo, kind)(**kw), params, grads)
    theirs = run_torch(lambda ps: TORCH[kind](ps, foreach=True, **kw), params, grads)
    assert_trajectories_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("adamax", torch.optim.Adamax),
        ("nadam", torch.optim.NAdam),
        ("radam", torch.optim.RAdam),
        ("rmsprop", torch.optim.RMSprop),
        ("adagrad", torch.optim.Adagrad),
        ("adafactor", torch.optim.Adafactor),
    ],
)
def test_defaults_match_torch(kind, cls):
    params, grads = make_params(1), make_grads(1, 30)
    ours, _ = run_ours(getattr(lo, kind)(), params, grads)
    assert_trajectories_close(ours, run_torch(cls, params, grads))


def lion_oracle(params, grads_seq, lr, betas, wd):
    """The paper's pseudo-code, one float64 tensor at a time."""
    b1, b2 = betas
    p = {k: v.clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    out = []
    for grads in grads_seq:
        for k, g in grads.items():
            c = b1 * m[k] + (1 - b1) * g
            p[k] = p[k] - lr * (torch.sign(c) + wd * p[k])
            m[k] = b2 * m[k] + (1 - b2) * g
        out.append({k: v.clone() for k, v in p.items()})
    return out


@fast
@given(
    lr=st.floats(1e-5, 1e-2),
    b1=st.floats(0.5, 0.99),
    b2=st.floats(0.9, 0.999),
    wd=st.sampled_from([0.0, 0.1, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_lion_matches_the_papers_pseudo_code(lr, b1, b2, wd, seed):
    params, grads = make_params(seed), make_grads(seed, STEPS)
    ours, _ = run_ours(lo.lion(lr, betas=(b1, b2), weight_decay=wd), params, grads)
    assert_trajectories_close(ours, lion_oracle(params, grads, lr, (b1, b2), wd))


def test_lion_defaults():
    params, grads = make_params(2), make_grads(2, 20)
    ours, _ = run_ours(lo.lion(), params, grads)
    assert_trajectories_close(ours, lion_oracle(params, grads, 1e-4, (0.9, 0.99), 0.0))


def test_lion_maximize_is_descent_on_the_negated_gradient():
    params, grads = make_params(3), make_grads(3, 10)
    negated = [{k: -g for k, g in step.items()} for step in grads]
    up, _ = run_ours(lo.lion(1e-3, maximize=True), params, grads)
    down, _ = run_ours(lo.lion(1e-3), params, negated)
    assert_trajectories_close(up, down, rtol=0, atol=0)


# --------------------------------------------------------------------------- schedules


def _decaying(base):
    return lambda t: base * 0.95 ** t.double()


SCHEDULED_HYPERS = [
    # (factory with schedules, torch class and constant kwargs, {group key: schedule(t)})
    (
        lambda: lo.adam(0.01, betas=(_decaying(0.9), 0.999), weight_decay=_decaying(0.1)),
        lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1),
        {"betas": lambda t: (0.9 * 0.95**t, 0.999), "weight_decay": lambda t: 0.1 * 0.95**t},
    ),
    (
        lambda: lo.sgd(0.1, momentum=_decaying(0.9), dampening=_decaying(0.1)),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1),
        {"momentum": lambda t: 0.9 * 0.95**t, "dampening": lambda t: 0.1 * 0.95**t},
    ),
    (
        lambda: lo.rmsprop(0.01, alpha=_decaying(0.99), eps=_decaying(1e-3), momentum=0.5),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5),
        {"alpha": lambda t: 0.99 * 0.95**t, "eps": lambda t: 1e-3 * 0.95**t},
    ),
    (
        lambda: lo.adamw(_decaying(0.01), weight_decay=_decaying(0.1)),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
        {"lr": lambda t: 0.01 * 0.95**t, "weight_decay": lambda t: 0.1 * 0.95**t},
    ),
]


@pytest.mark.parametrize(
    ("ours", "theirs", "sets"), SCHEDULED_HYPERS, ids=["adam", "sgd", "rmsprop", "adamw"]
)
def test_any_hyperparameter_may_be_a_schedule(ours, theirs, sets):
    """torch.optim with each scheduled value set in its group before step t is the oracle."""
    params, grads = make_params(8), make_grads(8, 50)
    mine, _ = run_ours(ours(), params, grads)
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    opt = theirs(list(leaves.values()))
    reference = []
    for t, g in enumerate(grads):
        for key, value in sets.items():
            opt.param_groups[0][key] = value(t)
        for k, p in leaves.items():
            p.grad = g[k].clone()
        opt.step()
        reference.append({k: p.detach().clone() for k, p in leaves.items()})
    assert_trajectories_close(mine, reference)


# --------------------------------------------------------------------------- conformance


def _schedule(t):
    return 0.01 * 0.9 ** t.double()


ALL = {
    "sgd": lambda: lo.sgd(0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True),
    "sgd_nesterov_schedule": lambda: lo.sgd(_schedule, momentum=0.9, nesterov=True),
    "adam_amsgrad": lambda: lo.adam(_schedule, weight_decay=0.01, amsgrad=True),
    "adamw_mask": lambda: lo.adamw(0.01, weight_decay=0.1, mask=lambda n, p: p.dim() >= 2),
    "adamax": lambda: lo.adamax(0.01, weight_decay=0.01),
    "nadam": lambda: lo.nadam(_schedule, weight_decay=0.01),
    "nadam_decoupled": lambda: lo.nadam(0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "radam": lambda: lo.radam(0.01, weight_decay=0.01),
    "radam_decoupled": lambda: lo.radam(_schedule, weight_decay=0.1, decoupled_weight_decay=True),
    "rmsprop": lambda: lo.rmsprop(0.01, weight_decay=0.01),
    "rmsprop_centered_momentum": lambda: lo.rmsprop(_schedule, momentum=0.9, centered=True),
    "adagrad": lambda: lo.adagrad(
        0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1
    ),
    "adafactor": lambda: lo.adafactor(0.01, weight_decay=0.1),
    "adafactor_schedule": lambda: lo.adafactor(_schedule, beta2_decay=-0.5, maximize=True),
    "lion": lambda: lo.lion(_schedule, weight_decay=0.1),
    "betas_schedule": lambda: lo.adam(0.01, betas=(lambda t: 0.9 - 0.4 * 0.5 ** t.double(), 0.999)),
    "masked": lambda: lo.masked(lo.adam(0.01), lambda n, p: n != "scale"),
    "partition": lambda: lo.partition(
        {"decay": lo.adamw(_schedule, weight_decay=0.1), "rest": lo.sgd(0.1, momentum=0.9)},
        lambda n, p: "decay" if p.dim() >= 2 else "rest",
    ),
}


def _warm(opt, params, steps, seed=11):
    state = opt.init(params)
    for g in make_grads(seed, steps):
        params, state = opt.update(g, state, params)
    return params, state


def _clone(tree):
    return optree.tree_map(torch.clone, tree)


def _assert_same(a, b, rtol=0.0, atol=0.0):
    assert optree.tree_structure(a) == optree.tree_structure(b)
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("name", ALL)
def test_update_is_pure_and_update__is_update_bitwise(name):
    opt = ALL[name]()
    for warm in (0, 2):
        params, state = _warm(opt, make_params(1), warm)
        grads = make_grads(12, 1)[0]
        leaves = optree.tree_leaves((grads, state, params))
        clones = [x.clone() for x in leaves]
        versions = [x._version for x in leaves]
        want = opt.update(grads, state, params)
        for x, c, v in zip(leaves, clones, versions, strict=True):
            assert x._version == v
            torch.testing.assert_close(x, c, rtol=0, atol=0)
        inputs = {x.data_ptr() for x in leaves}
        outputs = {x.data_ptr() for x in optree.tree_leaves(want)}
        if name != "masked":  # masked passes the unmasked parameters through as they are
            assert not inputs & outputs
        assert optree.tree_structure(want[1]) == optree.tree_structure(state)
        p_, s_ = _clone((params, state))
        got = opt.update_(grads, s_, p_)
        assert got[0] is p_ and got[1] is s_
        _assert_same(got, want)
        for g, c in zip(optree.tree_leaves(grads), clones, strict=False):
            torch.testing.assert_close(g, c, rtol=0, atol=0)  # update_ leaves grads alone


def _stack(trees):
    return optree.tree_map(lambda *xs: torch.stack(xs), *trees)


def _member(tree, i):
    return optree.tree_map(lambda x: x[i], tree)


@pytest.mark.parametrize("name", ALL)
def test_vmapped_update_is_the_members_updates(name):
    """An ensemble of 3 members at different counts: each state leaf stacked on axis 0."""
    opt = ALL[name]()
    members = [_warm(opt, make_params(20 + i), i, seed=30 + i) for i in range(3)]
    grads = [make_grads(40 + i, 1)[0] for i in range(3)]
    params = _stack([p for p, _ in members])
    state = _stack([s for _, s in members])
    g = _stack(grads)
    new = torch.func.vmap(opt.update)(g, state, params)
    for i, (p_i, s_i) in enumerate(members):
        _assert_same(_member(new, i), opt.update(grads[i], s_i, p_i), rtol=1e-13, atol=1e-15)
    lrs = torch.func.vmap(opt.hyperparams)(new[1])
    for i, (p_i, s_i) in enumerate(members):
        want = opt.hyperparams(opt.update(grads[i], s_i, p_i)[1])
        _assert_same({k: v[i] for k, v in lrs.items()}, want)
    # update_ under vmap writes into the stacked tensors.
    p_, s_ = _clone((params, state))
    torch.func.vmap(opt.update_)(g, s_, p_)
    _assert_same((p_, s_), new, rtol=1e-13, atol=1e-15)


COMPILED = [
    "sgd_nesterov_schedule",
    "adam_amsgrad",
    "nadam",
    "radam_decoupled",
    "rmsprop_centered_momentum",
    "adagrad",
    "adafactor_schedule",
    "lion",
    "partition",
]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", COMPILED)
def test_update_compiles_to_one_graph(name):
    """Captured whole by dynamo (fullgraph) and run eagerly (the cheap backend)."""
    torch._dynamo.reset()
    opt = ALL[name]()
    params, state = _warm(opt, make_params(5), 2)
    grads = make_grads(6, 1)[0]
    got = torch.compile(opt.update, fullgraph=True, backend="eager")(grads, state, params)
    _assert_same(got, opt.update(grads, state, params), rtol=1e-13, atol=1e-15)
    p_, s_ = _clone((params, state))
    torch.compile(opt.update_, fullgraph=True, backend="eager")(grads, s_, p_)
    _assert_same((p_, s_), got, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", ALL)
def test_empty_params_and_state_structure(name):
    opt = ALL[name]()
    state = opt.init({})
    new_params, new_state = opt.update({}, state, {})
    assert new_params == {}
    assert optree.tree_structure(new_state) == optree.tree_structure(state)


# --------------------------------------------------------------------------- hyperparams


def test_hyperparams_report_the_last_updates_lr():
    seen = []

    def schedule(t):
        seen.append(int(t))
        return 0.1 * 0.9 ** t.double()

    opt = lo.adam(schedule)
    params = make_params(0)
    state = opt.init(params)
    assert float(opt.hyperparams(state)["lr"]) == 0.1  # before any update: the first one's
    for k, g in enumerate(make_grads(0, 4)):
        params, state = opt.update(g, state, params)
        lr = opt.hyperparams(state)["lr"]
        assert (lr.dtype, lr.shape) == (torch.float64, ())
        assert float(lr) == 0.1 * 0.9**k
    assert seen[-1] == 3


@pytest.mark.parametrize(
    "kind",
    ["sgd", "adam", "adamw", "adamax", "nadam", "radam", "rmsprop", "adagrad", "adafactor", "lion"],
)
def test_a_constant_lr_is_reported_as_a_float32_tensor(kind):
    opt = getattr(lo, kind)(0.25)
    params = make_params(0)
    state = opt.update(make_grads(0, 1)[0], opt.init(params), params)[1]
    lr = opt.hyperparams(state)["lr"]
    assert (lr.dtype, lr.shape, float(lr)) == (torch.float32, (), 0.25)


def test_partition_reports_lr_per_label():
    opt = ALL["partition"]()
    params = make_params(0)
    state = opt.init(params)
    for k, g in enumerate(make_grads(0, 3)):
        params, state = opt.update(g, state, params)
        hp = opt.hyperparams(state)
        assert sorted(hp) == ["lr/decay", "lr/rest"]
        assert float(hp["lr/decay"]) == 0.01 * 0.9**k
        assert float(hp["lr/rest"]) == pytest.approx(0.1)


# --------------------------------------------------------------------------- the torch habit


FACTORIES = [
    "sgd",
    "adam",
    "adamw",
    "adamax",
    "nadam",
    "radam",
    "rmsprop",
    "adagrad",
    "adafactor",
    "lion",
]


@pytest.mark.parametrize("kind", FACTORIES)
def test_params_as_first_argument_get_a_clear_error(kind):
    model = torch.nn.Linear(2, 1)
    factory = getattr(lo, kind)
    message = (
        re.escape(f"{kind}(lr=<generator object Module.parameters at")
        + r".*looplib optimizers take hyperparameters only; the state's params are passed at ll.init"
    )
    with pytest.raises(TypeError, match=message):
        factory(model.parameters(), lr=1e-3)
    for params in (list(model.parameters()), model, [{"params": list(model.parameters())}]):
        with pytest.raises(TypeError, match="looplib optimizers take hyperparameters only"):
            factory(params)


BAD = [
    (
        lo.rmsprop,
        {"alpha": 1.5},
        ValueError,
        "rmsprop(alpha=1.5): alpha must be a real number in [0.0, 1.0], got 1.5.",
    ),
    (
        lo.rmsprop,
        {"centered": 1},
        TypeError,
        "rmsprop(centered=1): centered must be a bool, got 1.",
    ),
    (
        lo.adagrad,
        {"initial_accumulator_value": -1.0},
        ValueError,
        "adagrad(initial_accumulator_value=-1.0): initial_accumulator_value must be a non-negative real number",
    ),
    (
        lo.adagrad,
        {"lr_decay": -0.1},
        ValueError,
        "adagrad(lr_decay=-0.1): lr_decay must be a non-negative real number",
    ),
    (
        lo.nadam,
        {"momentum_decay": float("nan")},
        ValueError,
        "nadam(momentum_decay=nan): momentum_decay must be a non-negative real number",
    ),
    (
        lo.nadam,
        {"decoupled_weight_decay": "yes"},
        TypeError,
        "nadam(decoupled_weight_decay='yes'): decoupled_weight_decay must be a bool",
    ),
    (lo.radam, {"betas": (0.9, 1.0)}, ValueError, "radam(betas=(0.9, 1.0)): betas must be a pair"),
    (
        lo.adam,
        {"amsgrad": None},
        TypeError,
        "adam(amsgrad=None): amsgrad must be a bool, got None.",
    ),
    (lo.adamw, {"maximize": 0}, TypeError, "adamw(maximize=0): maximize must be a bool, got 0."),
    (
        lo.adafactor,
        {"d": 0.5},
        ValueError,
        "adafactor(d=0.5): d must be a real number in [1.0, inf), got 0.5.",
    ),
    (
        lo.adafactor,
        {"beta2_decay": 0.1},
        ValueError,
        "adafactor(beta2_decay=0.1): beta2_decay must be a real number in (-inf, 0.0]",
    ),
    (
        lo.adafactor,
        {"eps": 1e-3},
        TypeError,
        "adafactor(eps=0.001): eps must be a pair (eps1, eps2)",
    ),
    (
        lo.lion,
        {"weight_decay": -1.0},
        ValueError,
        "lion(weight_decay=-1.0): weight_decay must be a non-negative real number",
    ),
    (
        lo.lion,
        {"lr": -1.0},
        ValueError,
        "lion(lr=-1.0): lr must be a non-negative finite real number or a schedule",
    ),
    (
        lo.adamax,
        {"eps": -1.0},
        ValueError,
        "adamax(eps=-1.0): eps must be a non-negative real number",
    ),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "exc", "message"),
    BAD,
    ids=[f"{f.__name__}-{i}" for i, (f, _, _, _) in enumerate(BAD)],
)
def test_bad_arguments(factory, kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        factory(**kwargs)


def test_a_schedule_must_return_a_0d_value():
    opt = lo.sgd(lambda t: torch.ones(2))
    params = make_params(0)
    with pytest.raises(ValueError, match=r"A schedule must return a number or a 0-d tensor"):
        opt.update(make_grads(0, 1)[0], opt.init(params), params)


# --------------------------------------------------------------------------- the list-op layer


def _lists(seed=0, n=3):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), ()]
    return [
        [torch.rand(s, generator=gen, dtype=torch.float64) + 0.5 for s in shapes] for _ in range(n)
    ]


S = torch.tensor(0.3, dtype=torch.float64)
OPS = {
    "neg": lambda a, b, c: ops.neg(a),
    "abs": lambda a, b, c: ops.abs(ops.neg(a)),
    "abs_": lambda a, b, c: ops.abs_(ops.neg(a)),
    "sign": lambda a, b, c: ops.sign(ops.add(a, -1.0)),
    "sign_": lambda a, b, c: ops.sign_(ops.add(a, -1.0)),
    "sqrt": lambda a, b, c: ops.sqrt(a),
    "sqrt_": lambda a, b, c: ops.sqrt_(a),
    "rsqrt_": lambda a, b, c: ops.rsqrt_(a),
    "reciprocal_": lambda a, b, c: ops.reciprocal_(a),
    "norm": lambda a, b, c: ops.norm(a),
    "add_list_alpha": lambda a, b, c: ops.add(a, b, alpha=0.7),
    "add_scalar": lambda a, b, c: ops.add(a, 0.7),
    "add_tensor": lambda a, b, c: ops.add(a, S),
    "add_tensor_alpha": lambda a, b, c: ops.add(a, b, alpha=S),
    "add_": lambda a, b, c: ops.add_(a, b, alpha=-0.3),
    "add__tensor": lambda a, b, c: ops.add_(a, S),
    "mul_scalar": lambda a, b, c: ops.mul(a, 0.7),
    "mul_tensor": lambda a, b, c: ops.mul(a, S),
    "mul_list": lambda a, b, c: ops.mul(a, b),
    "mul_": lambda a, b, c: ops.mul_(a, S),
    "div": lambda a, b, c: ops.div(a, b),
    "div_": lambda a, b, c: ops.div_(a, 0.3),
    "div_tensor": lambda a, b, c: ops.div(a, S),
    "maximum": lambda a, b, c: ops.maximum(a, b),
    "maximum_": lambda a, b, c: ops.maximum_(a, b),
    "clamp_min": lambda a, b, c: ops.clamp_min(a, 0.9),
    "clamp_min_": lambda a, b, c: ops.clamp_min_(a, 0.9),
    "lerp": lambda a, b, c: ops.lerp(a, b, 0.3),
    "lerp_": lambda a, b, c: ops.lerp_(a, b, 0.7),
    "lerp_tensor": lambda a, b, c: ops.lerp(a, b, S),
    "addcmul": lambda a, b, c: ops.addcmul(a, b, c, 0.3),
    "addcmul_": lambda a, b, c: ops.addcmul_(a, b, c, S),
    "addcdiv": lambda a, b, c: ops.addcdiv(a, b, c, -0.3),
    "addcdiv_": lambda a, b, c: ops.addcdiv_(a, b, c, S),
    "copy_": lambda a, b, c: ops.copy_(a, b),
    "where": lambda a, b, c: ops.where(torch.tensor(True), a, b),
    "where_": lambda a, b, c: ops.where_(torch.tensor(False), a, b),
}


@pytest.mark.parametrize("name", OPS)
def test_per_tensor_and_foreach_give_the_same_bits(name):
    """The vmap fallback (per tensor, on batched tensors) against the foreach op, per member."""
    members = [_lists(i) for i in range(3)]  # member i: three lists a, b, c
    foreach = [OPS[name](*[[x.clone() for x in lst] for lst in m]) for m in members]
    stacked = [[torch.stack([m[j][k] for m in members]) for k in range(3)] for j in range(3)]
    batched = torch.func.vmap(
        lambda *flat: OPS[name](list(flat[0:3]), list(flat[3:6]), list(flat[6:9]))
    )(*[x.clone() for lst in stacked for x in lst])
    for i, want in enumerate(foreach):
        for a, b in zip(want, batched, strict=True):
            assert torch.equal(a, b[i]), (name, i)
