"""``from_torch`` against the torch.optim class itself: bit for bit, pure, and its refusals."""

from __future__ import annotations

import re

import optree
import pytest
import torch

import looplib.optim as lo
from tests.test_optim import assert_trajectories_close, make_grads, make_params, run_ours, run_torch

CLASSES = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (torch.optim.Adam, dict(lr=0.01, amsgrad=True)),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    (torch.optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
    (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01)),
    (torch.optim.NAdam, dict(lr=0.01, decoupled_weight_decay=True, weight_decay=0.1)),
    (torch.optim.RAdam, dict(lr=0.01)),
    (torch.optim.Adamax, dict(lr=0.01)),
    (torch.optim.ASGD, dict(lr=0.01, t0=5.0)),
    (torch.optim.Rprop, dict(lr=0.01)),
    (torch.optim.Adadelta, dict(lr=0.5)),
    (torch.optim.Adafactor, dict(lr=0.01)),
]


@pytest.mark.parametrize(("cls", "kw"), CLASSES, ids=[c.__name__ for c, _ in CLASSES])
def test_from_torch_is_the_class_bit_for_bit(cls, kw):
    params, grads = make_params(0), make_grads(0, 20)
    ours, state = run_ours(lo.from_torch(cls, **kw), params, grads)
    assert_trajectories_close(
        ours, run_torch(lambda ps: cls(ps, **kw), params, grads), rtol=0, atol=0
    )
    assert int(state.count) == 20
    assert list(state.state) == list(params)


def test_state_holds_torchs_per_parameter_state():
    opt = lo.from_torch(torch.optim.Adam, lr=0.01)
    params = make_params(1)
    state = opt.init(params)
    assert sorted(state.state["layer.weight"]) == ["exp_avg", "exp_avg_sq", "step"]
    assert not any(x.any() for x in optree.tree_leaves(state.state))  # placeholders
    _, new_state = opt.update(make_grads(1, 1)[0], state, params)
    assert optree.tree_structure(new_state) == optree.tree_structure(state)
    assert float(new_state.state["scale"]["step"]) == 1.0


def test_update_is_pure_and_update__agrees():
    opt = lo.from_torch(torch.optim.SGD, lr=0.1, momentum=0.9)
    params = make_params(2)
    state = opt.update(make_grads(2, 1)[0], opt.init(params), params)[1]
    grads = make_grads(3, 1)[0]
    leaves = optree.tree_leaves((grads, state, params))
    clones, versions = [x.clone() for x in leaves], [x._version for x in leaves]
    want = opt.update(grads, state, params)
    for x, c, v in zip(leaves, clones, versions, strict=True):
        assert x._version == v
        torch.testing.assert_close(x, c, rtol=0, atol=0)
    assert not {x.data_ptr() for x in leaves} & {x.data_ptr() for x in optree.tree_leaves(want)}
    p_, s_ = optree.tree_map(torch.clone, (params, state))
    got = opt.update_(grads, s_, p_)
    assert got[0] is p_ and got[1] is s_
    for a, b in zip(optree.tree_leaves(got), optree.tree_leaves(want), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_matches_the_native_optimizer():
    params, grads = make_params(4), make_grads(4, 20)
    a, _ = run_ours(lo.from_torch(torch.optim.NAdam, lr=0.01, foreach=True), params, grads)
    b, _ = run_ours(lo.nadam(0.01), params, grads)
    assert_trajectories_close(a, b, rtol=0, atol=0)


def test_hyperparams_give_the_groups_lr():
    opt = lo.from_torch(torch.optim.RMSprop, lr=0.25)
    lr = opt.hyperparams(opt.init(make_params(0)))["lr"]
    assert (lr.dtype, float(lr)) == (torch.float32, 0.25)
    assert float(lo.from_torch(torch.optim.Adam).hyperparams(opt.init({}))["lr"]) == pytest.approx(
        1e-3
    )


@pytest.mark.parametrize(
    ("cls", "why"),
    [
        (torch.optim.LBFGS, "torch.optim.LBFGS cannot: it needs a closure"),
        (torch.optim.SparseAdam, "torch.optim.SparseAdam cannot: it needs sparse gradients"),
    ],
)
def test_classes_that_cannot_work_are_refused(cls, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        lo.from_torch(cls)


def test_empty_params():
    opt = lo.from_torch(torch.optim.Adam)
    new, state = opt.update({}, opt.init({}), {})
    assert new == {} and int(state.count) == 1


def test_bad_arguments():
    with pytest.raises(
        TypeError,
        match=re.escape("from_torch(cls='Adam'): cls must be a torch.optim.Optimizer subclass"),
    ):
        lo.from_torch("Adam")
    with pytest.raises(
        ValueError,
        match=r"must be accepted by torch.optim.Adam, got \{'lr': -1.0\}\. It raised ValueError: Invalid learning rate: -1.0",
    ):
        lo.from_torch(torch.optim.Adam, lr=-1.0)
    with pytest.raises(
        TypeError, match=r"must be accepted by torch.optim.SGD.*unexpected keyword argument 'betas'"
    ):
        lo.from_torch(torch.optim.SGD, lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="looplib optimizers take hyperparameters only"):
        lo.from_torch(torch.optim.SGD, params=[torch.zeros(2)], lr=0.1)


def test_vmap_is_refused_with_a_clear_error():
    opt = lo.from_torch(torch.optim.SGD, lr=0.1)
    params = {"w": torch.zeros(3, 2)}
    state = opt.init({"w": torch.zeros(2)})
    stacked = optree.tree_map(lambda x: torch.stack([x, x, x]), state)
    with pytest.raises(
        RuntimeError,
        match=re.escape("from_torch(SGD): a torch.optim class cannot run under torch.func.vmap"),
    ):
        torch.func.vmap(opt.update)({"w": torch.ones(3, 2)}, stacked, params)
