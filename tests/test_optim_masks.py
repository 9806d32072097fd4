"""Weight-decay masks, ``masked`` and ``partition`` against torch.optim parameter groups."""

from __future__ import annotations

import re

import optree
import pytest
import torch

import looplib.optim as lo
from tests.test_optim import assert_trajectories_close, make_grads, make_params, run_ours

STEPS = 50


def run_torch_groups(groups, cls, params, grads_seq, **defaults):
    """torch.optim over parameter groups: ``groups`` is a list of (names, group options)."""
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    opt = cls([dict(params=[leaves[k] for k in names], **kw) for names, kw in groups], **defaults)
    out = []
    for g in grads_seq:
        for k, p in leaves.items():
            p.grad = g[k].clone()
        opt.step()
        out.append({k: p.detach().clone() for k, p in leaves.items()})
    return out


MATRICES, REST = ["layer.weight"], ["layer.bias", "scale"]


@pytest.mark.parametrize("foreach", [False, True])
def test_nanogpt_decay_groups_match_torch_adamw(foreach):
    params, grads = make_params(0), make_grads(0, STEPS)
    opt = lo.adamw(1e-2, weight_decay=0.1, mask=lambda name, p: p.dim() >= 2)
    ours, _ = run_ours(opt, params, grads)
    theirs = run_torch_groups(
        [(MATRICES, {"weight_decay": 0.1}), (REST, {"weight_decay": 0.0})],
        torch.optim.AdamW,
        params,
        grads,
        lr=1e-2,
        foreach=foreach,
    )
    assert_trajectories_close(ours, theirs, rtol=0, atol=0)


MASKED_DECAY = [
    (
        lambda m: lo.sgd(0.1, momentum=0.9, weight_decay=0.1, mask=m),
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9),
    ),
    (lambda m: lo.adam(0.01, weight_decay=0.1, mask=m), torch.optim.Adam, dict(lr=0.01)),
    (
        lambda m: lo.nadam(0.01, weight_decay=0.1, mask=m, decoupled_weight_decay=True),
        torch.optim.NAdam,
        dict(lr=0.01, decoupled_weight_decay=True),
    ),
    (lambda m: lo.radam(0.01, weight_decay=0.1, mask=m), torch.optim.RAdam, dict(lr=0.01)),
    (lambda m: lo.rmsprop(0.01, weight_decay=0.1, mask=m), torch.optim.RMSprop, dict(lr=0.01)),
    (lambda m: lo.adagrad(0.1, weight_decay=0.1, mask=m), torch.optim.Adagrad, dict(lr=0.1)),
    (lambda m: lo.adamax(0.01, weight_decay=0.1, mask=m), torch.optim.Adamax, dict(lr=0.01)),
    (lambda m: lo.adafactor(0.01, weight_decay=0.1, mask=m), torch.optim.Adafactor, dict(lr=0.01)),
]


@pytest.mark.parametrize(
    ("ours", "cls", "kw"), MASKED_DECAY, ids=lambda x: getattr(x, "__name__", "")
)
def test_a_decay_mask_is_two_torch_param_groups(ours, cls, kw):
    params, grads = make_params(1), make_grads(1, STEPS)
    mask = {"layer.weight": True, "layer.bias": False, "scale": True}
    mine, _ = run_ours(ours(mask), params, grads)
    theirs = run_torch_groups(
        [
            (["layer.weight", "scale"], {"weight_decay": 0.1}),
            (["layer.bias"], {"weight_decay": 0.0}),
        ],
        cls,
        params,
        grads,
        foreach=True,
        **kw,
    )
    assert_trajectories_close(mine, theirs, rtol=0, atol=0)


def test_lion_decay_mask():
    params, grads = make_params(2), make_grads(2, 20)
    mine, _ = run_ours(
        lo.lion(1e-3, weight_decay=1.0, mask=lambda n, p: n == "scale"), params, grads
    )
    plain, _ = run_ours(lo.lion(1e-3), params, grads)
    decayed, _ = run_ours(lo.lion(1e-3, weight_decay=1.0), params, grads)
    for t in range(20):
        torch.testing.assert_close(
            mine[t]["layer.weight"], plain[t]["layer.weight"], rtol=0, atol=0
        )
        torch.testing.assert_close(mine[t]["scale"], decayed[t]["scale"], rtol=0, atol=0)


def test_partition_is_torch_param_groups():
    params, grads = make_params(3), make_grads(3, STEPS)
    opt = lo.partition(
        {"decay": lo.adamw(1e-2, weight_decay=0.1), "no_decay": lo.adamw(3e-3, weight_decay=0.0)},
        lambda name, p: "decay" if p.dim() >= 2 else "no_decay",
    )
    mine, state = run_ours(opt, params, grads)
    theirs = run_torch_groups(
        [(MATRICES, {"weight_decay": 0.1, "lr": 1e-2}), (REST, {"weight_decay": 0.0, "lr": 3e-3})],
        torch.optim.AdamW,
        params,
        grads,
        foreach=True,
    )
    assert_trajectories_close(mine, theirs, rtol=0, atol=0)
    assert list(state) == ["decay", "no_decay"]
    assert list(state["decay"].mu) == MATRICES
    assert list(state["no_decay"].mu) == REST


def test_partition_mixes_optimizers_and_keeps_params_order():
    params, grads = make_params(4), make_grads(4, 10)
    labels = {"layer.weight": "adam", "layer.bias": "sgd", "scale": "adam"}
    opt = lo.partition({"sgd": lo.sgd(0.1, momentum=0.9), "adam": lo.adam(0.01)}, labels)
    mine, _ = run_ours(opt, params, grads)
    alone_sgd, _ = run_ours(
        lo.sgd(0.1, momentum=0.9),
        {"layer.bias": params["layer.bias"]},
        [{"layer.bias": g["layer.bias"]} for g in grads],
    )
    for t in range(10):
        assert list(mine[t]) == list(params)
        torch.testing.assert_close(
            mine[t]["layer.bias"], alone_sgd[t]["layer.bias"], rtol=0, atol=0
        )


def test_masked_updates_only_the_mask_and_keeps_no_state_for_the_rest():
    params, grads = make_params(5), make_grads(5, 10)
    opt = lo.masked(lo.adam(0.01), lambda name, p: name != "scale")
    mine, state = run_ours(opt, params, grads)
    assert list(state.inner.mu) == ["layer.weight", "layer.bias"]
    sub = {k: params[k] for k in ["layer.weight", "layer.bias"]}
    alone, _ = run_ours(lo.adam(0.01), sub, [{k: g[k] for k in sub} for g in grads])
    for t in range(10):
        assert mine[t]["scale"] is params["scale"]
        for k in sub:
            torch.testing.assert_close(mine[t][k], alone[t][k], rtol=0, atol=0)


def test_masks_are_resolved_once_per_name_set():
    calls = []

    def mask(name, p):
        calls.append(name)
        return p.dim() >= 2

    opt = lo.adamw(1e-2, mask=mask)
    run_ours(opt, make_params(0), make_grads(0, 5))
    assert calls == ["layer.weight", "layer.bias", "scale"]


def test_masked_state_under_update__and_partition_update_():
    for opt in (
        lo.masked(
            lo.sgd(0.1, momentum=0.9), {"layer.weight": True, "layer.bias": False, "scale": True}
        ),
        lo.partition(
            {"a": lo.adam(0.01), "b": lo.lion(1e-3)}, lambda n, p: "a" if p.dim() else "b"
        ),
    ):
        params = make_params(6)
        state = opt.init(params)
        want = opt.update(make_grads(6, 1)[0], state, params)
        p_, s_ = optree.tree_map(torch.clone, (params, state))
        got = opt.update_(make_grads(6, 1)[0], s_, p_)
        for a, b in zip(optree.tree_leaves(got), optree.tree_leaves(want), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------- errors

P = make_params(0)


def _init(opt):
    return opt.init(P)


ERRORS = [
    (
        lambda: _init(
            lo.adamw(mask={"layer.weight": True, "layer.bias": False, "scale": True, "typo": True})
        ),
        ValueError,
        "mask must name only parameters, got {'layer.weight': True, 'layer.bias': False, 'scale': True, 'typo': True}. 'typo' matches no parameter; parameters: ['layer.weight', 'layer.bias', 'scale'].",
    ),
    (
        lambda: _init(lo.adamw(mask={"layer.weight": True})),
        ValueError,
        "adamw(mask={'layer.weight': True}): mask must name every parameter (a dict is explicit; pass a callable (name, param) -> value for a rule), got {'layer.weight': True}. Missing: ['layer.bias', 'scale'].",
    ),
    (
        lambda: lo.adamw(mask={"layer.weight": 1}),
        TypeError,
        "adamw(mask={'layer.weight': 1}): mask must give a bool for every parameter, got {'layer.weight': 1}. The value for 'layer.weight' is 1 (int); use True or False.",
    ),
    (
        lambda: _init(lo.sgd(0.1, weight_decay=0.1, mask=lambda n, p: p.dim())),
        TypeError,
        "mask must give a bool for every parameter, got <function",
    ),
    (
        lambda: _init(lo.sgd(0.1, weight_decay=0.1, mask=lambda n, p: p.dim())),
        TypeError,
        "It returned 2 (int) for 'layer.weight'; use True or False.",
    ),
    (
        lambda: lo.adam(mask="decay"),
        TypeError,
        "adam(mask='decay'): mask must be a dict {name: bool} or a callable (name, param) -> bool, got 'decay'.",
    ),
    (
        lambda: lo.partition(
            {"a": lo.sgd(0.1)}, {"layer.weight": "a", "layer.bias": "b", "scale": "a"}
        ),
        ValueError,
        "mask must give every parameter a label that has an optimizer".replace("mask", "labels")
        + ", got {'layer.weight': 'a', 'layer.bias': 'b', 'scale': 'a'}. The value for 'layer.bias' is 'b' (str), which has no optimizer; labels with one: ['a'].",
    ),
    (
        lambda: _init(lo.partition({"a": lo.sgd(0.1)}, lambda n, p: "a" if p.dim() else "z")),
        ValueError,
        "It returned 'z' (str) for 'scale', which has no optimizer; labels with one: ['a'].",
    ),
    (
        lambda: _init(lo.partition({"a": lo.sgd(0.1)}, {"layer.weight": "a"})),
        ValueError,
        "partition(labels={'layer.weight': 'a'}): labels must name every parameter",
    ),
    (
        lambda: _init(lo.masked(lo.sgd(0.1), {"w": True})),
        ValueError,
        "masked(mask={'w': True}): mask must name only parameters, got {'w': True}. 'w' matches no parameter",
    ),
    (
        lambda: lo.partition({}, {}),
        TypeError,
        "partition(optimizers={}): optimizers must be a non-empty dict {label: optimizer}",
    ),
    (lambda: lo.partition({1: lo.sgd(0.1)}, {}), TypeError, "optimizers must have str labels"),
    (
        lambda: lo.partition({"a": "adam"}, {}),
        TypeError,
        "partition(optimizers['a']='adam'): optimizers['a'] must be a looplib optimizer",
    ),
    (
        lambda: lo.masked(torch.optim.Adam, {}),
        TypeError,
        "masked(opt=<class 'torch.optim.adam.Adam'>): opt must be a looplib optimizer",
    ),
]


@pytest.mark.parametrize(
    ("make", "exc", "message"), ERRORS, ids=[str(i) for i in range(len(ERRORS))]
)
def test_mask_and_label_errors(make, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        make()
