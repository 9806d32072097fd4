"""The base step: ``train_step``, ``init``, ``LossOutput``, ``sample_count``.

Oracle: a hand-written ``torch.optim`` loop. Laws: the step is pure, it leaves the template
module alone, and its state keeps one structure.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import looplib as ll
from tests.helpers import (
    assert_params_close,
    assert_pure,
    assert_same_structure,
    assert_snapshot_unchanged,
    assert_trees_equal,
    mlp,
    mse,
    params_of,
    regression_batch,
    regression_batches,
    snapshot,
)

OPTIMIZERS = {
    "sgd": (lambda: ll.optim.sgd(0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "sgd-nesterov-wd": (
        lambda: ll.optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    ),
    "adam": (lambda: ll.optim.adam(0.01), lambda ps: torch.optim.Adam(ps, lr=0.01)),
    "adamw": (
        lambda: ll.optim.adamw(0.01, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    ),
}


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_train_step_matches_torch_optim_over_20_steps(name: str) -> None:
    ours, theirs = OPTIMIZERS[name]
    model = mlp(seed=1)
    ref = copy.deepcopy(model)
    batches = regression_batches([8] * 20, seed=100)

    opt = ours()
    state, metrics = ll.scan(ll.train_step(model, mse, opt), ll.init(model, opt), batches)

    torch_opt = theirs(ref.parameters())
    losses = []
    for batch in batches:
        torch_opt.zero_grad()
        loss = mse(ref, batch)
        loss.backward()
        torch_opt.step()
        losses.append(loss.detach())

    assert_params_close(state, ref)
    assert int(state.step) == 20
    torch.testing.assert_close(torch.stack([m["loss"] for m in metrics]), torch.stack(losses))


def test_batchnorm_running_stats_follow_the_imperative_module() -> None:
    model = mlp(batchnorm=True, seed=2)
    ref = copy.deepcopy(model)
    batches = regression_batches([6, 5, 7], seed=3)
    opt = ll.optim.sgd(0.1)
    state = ll.fold(ll.train_step(model, mse, opt), ll.init(model, opt), batches)
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for batch in batches:
        torch_opt.zero_grad()
        mse(ref, batch).backward()
        torch_opt.step()
    assert_params_close(state, ref)
    for name, b in ref.named_buffers():
        torch.testing.assert_close(state.buffers[name], b, rtol=1e-10, atol=1e-12)
    assert int(state.buffers["1.num_batches_tracked"]) == 3


# --------------------------------------------------------------------------- init and the call


def test_init_copies_the_module_and_starts_at_zero() -> None:
    model = mlp(batchnorm=True)
    state = ll.init(model, ll.optim.sgd(0.1))
    assert isinstance(state, ll.TrainState)
    assert state.params.keys() == dict(model.named_parameters()).keys()
    assert state.buffers.keys() == dict(model.named_buffers()).keys()
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p.detach())
        assert state.params[name].data_ptr() != p.data_ptr()
        assert not state.params[name].requires_grad
    assert state.step.dtype == torch.int64 and state.step.shape == () and int(state.step) == 0
    assert state.metrics == {} and sorted(state.slots) == ["rng"]
    key = state.slots["rng"]
    assert key.dtype == torch.int64 and key.shape == (2,) and int(key[1]) == 0
    assert 0 <= int(key[0]) < 2**63


def test_init_keys_the_state_by_the_seed_or_by_the_global_generator() -> None:
    model, opt = mlp(), ll.optim.sgd(0.1)
    assert ll.init(model, opt, seed=7).slots["rng"].tolist() == [7, 0]
    assert ll.init(model, opt, seed=2**63 - 1).slots["rng"].tolist() == [2**63 - 1, 0]
    # Without seed=, the seed is drawn from torch's global generator, at init.
    torch.manual_seed(3)
    a = ll.init(model, opt).slots["rng"]
    after_a = torch.random.get_rng_state()
    b = ll.init(model, opt).slots["rng"]
    torch.manual_seed(3)
    assert torch.equal(ll.init(model, opt).slots["rng"], a)
    assert torch.equal(torch.random.get_rng_state(), after_a)
    assert not torch.equal(a, b)


def test_step_init_completes_the_structure_before_the_first_update() -> None:
    """``step.init(state, batch)`` adds the loss's metrics (NaN, with their dtypes), the weight
    and the learning rate, and changes nothing else; it is idempotent and never draws from the
    global generator."""
    model = mlp(dropout=0.5, batchnorm=True)
    opt = ll.optim.adam(0.05)

    def loss_fn(m, b):
        out = m(b[0])
        return F.mse_loss(out, b[1]), {"mean_pred": out.mean().float(), "count": 3}

    step = ll.train_step(model, loss_fn, opt)
    state = ll.init(model, opt, seed=1)
    batch = regression_batch(4)
    snap = snapshot(state)
    global_rng = torch.random.get_rng_state()
    ready = step.init(state, batch)
    assert torch.equal(torch.random.get_rng_state(), global_rng)
    assert_snapshot_unchanged(snap)
    assert sorted(ready.metrics) == ["count", "loss", "lr", "mean_pred", "weight"]
    assert ready.metrics["loss"].dtype == torch.float64 and torch.isnan(ready.metrics["loss"])
    assert ready.metrics["mean_pred"].dtype == torch.float32
    assert ready.metrics["count"].dtype == torch.float32 and torch.isnan(ready.metrics["count"])
    assert ready.metrics["weight"].dtype == torch.float32 and float(ready.metrics["weight"]) == 0
    assert float(ready.metrics["lr"]) == pytest.approx(0.05)
    assert_trees_equal(ready._replace(metrics={}), state)  # the key's counter too: no update
    assert_trees_equal(step.init(ready), ready)
    assert_trees_equal(step.init(ready, regression_batch(9, seed=5)), ready)
    # The first update keeps that structure.
    assert_same_structure(step(ready, batch), ready)
    assert_trees_equal(step(state, batch), step(ready, batch))


def test_step_init_without_a_batch_needs_a_complete_state() -> None:
    model, opt = mlp(), ll.optim.sgd(0.1)
    step = ll.accumulate(2)(ll.train_step(model, mse, opt))
    message = (
        "step.init(state): this state has no loss metrics yet, so the step must see an example "
        "batch to learn what the loss reports; call step.init(state, batch) (fold, fit, and a "
        "first step(state, batch) do this for you)."
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        step.init(ll.init(model, opt))
    # A state with the loss metrics but without a transformer's slot needs one too.
    plain = ll.train_step(model, mse, opt)(ll.init(model, opt), regression_batch(3))
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        step.init(plain)
    ready = step.init(plain, regression_batch(3))
    assert sorted(ready.slots) == ["accumulate", "rng"]
    assert_trees_equal(step.init(ready), ready)


def test_step_leaves_the_template_module_untouched() -> None:
    model = mlp(batchnorm=True, dropout=0.5)
    before = {**params_of(model), **{k: b.clone() for k, b in model.named_buffers()}}
    opt = ll.optim.adam(0.1)
    step = ll.train_step(model, mse, opt)
    ll.fold(step, ll.init(model, opt), regression_batches([5, 5, 5]))
    after = {**params_of(model), **{k: b.clone() for k, b in model.named_buffers()}}
    assert_trees_equal(before, after)
    assert all(p.grad is None for p in model.parameters())


def test_step_is_pure_with_batchnorm_in_train_mode_and_dropout() -> None:
    model = mlp(batchnorm=True, dropout=0.3)
    opt = ll.optim.adam(0.05)
    step = ll.train_step(model, mse, opt)
    state = ll.init(model, opt)
    for batch in regression_batches([4, 6, 5]):
        new = assert_pure(step, state, batch)
        assert_same_structure(step.init(ll.init(model, opt), batch), new)
        assert not torch.equal(new.buffers["1.running_mean"], state.buffers["1.running_mean"])
        state = new


def test_the_same_state_and_batch_give_the_same_next_state() -> None:
    """Randomness is keyed by the state: two states with the same key step alike (dropout
    included), whatever the global generator holds, and the step never touches it."""
    model = mlp(dropout=0.5)
    opt = ll.optim.sgd(0.1)
    step = ll.train_step(model, mse, opt)
    batch = regression_batch(8)
    torch.manual_seed(7)
    first = ll.init(model, opt)
    torch.manual_seed(7)
    second = ll.init(model, opt)
    assert torch.equal(first.slots["rng"], second.slots["rng"])

    global_rng = torch.random.get_rng_state()
    a = step(first, batch)
    assert torch.equal(torch.random.get_rng_state(), global_rng)
    torch.manual_seed(12345)  # no effect on the step
    b = step(second, batch)
    assert_trees_equal(a, b)
    assert a.slots["rng"].tolist() == [int(first.slots["rng"][0]), 1]
    # Calling again on the same state gives the same state again.
    assert_trees_equal(step(first, batch), a)

    # The dropout is real: another key gives other masks, and the next call new ones.
    other = step(ll.init(model, opt, seed=int(first.slots["rng"][0]) + 1), batch)
    assert not torch.equal(other.params["0.weight"], a.params["0.weight"])
    again = step(a._replace(params=first.params, opt_state=first.opt_state), batch)
    assert not torch.equal(again.params["0.weight"], a.params["0.weight"])


def test_dropout_masks_follow_the_key_not_the_global_generator() -> None:
    model = mlp(dropout=0.5)
    opt = ll.optim.sgd(0.1)
    step = ll.train_step(model, mse, opt)
    batch = regression_batch(8)
    state = ll.init(model, opt, seed=0)
    results = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        results.append(step(state, batch))
    assert_trees_equal(results[0], results[1])
    # The key's seed and counter both matter.
    later = state._replace(slots={"rng": torch.tensor([0, 5])})
    assert not torch.equal(step(later, batch).params["0.weight"], results[0].params["0.weight"])


def test_metrics_are_loss_and_weight_tensors() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.0)
    batch = regression_batch(5)
    state = ll.train_step(model, mse, opt)(ll.init(model, opt), batch)
    assert sorted(state.metrics) == ["loss", "lr", "weight"]
    torch.testing.assert_close(state.metrics["loss"], mse(model, batch).detach())
    assert float(state.metrics["lr"]) == 0.0
    assert state.metrics["weight"].dtype == torch.float32 and float(state.metrics["weight"]) == 5
    assert not state.metrics["loss"].requires_grad


def test_unused_parameter_gets_a_zero_gradient() -> None:
    model = nn.ModuleDict({"used": nn.Linear(2, 1), "unused": nn.Linear(2, 1)}).double()
    opt = ll.optim.sgd(0.5)

    def loss_fn(m, batch):
        return m["used"](batch).pow(2).mean()

    state = ll.init(model, opt)
    new = ll.train_step(model, loss_fn, opt)(state, torch.ones(3, 2, dtype=torch.float64))
    assert torch.equal(new.params["unused.weight"], state.params["unused.weight"])
    assert not torch.equal(new.params["used.weight"], state.params["used.weight"])


@pytest.mark.parametrize(
    "wrap",
    [
        lambda loss, metrics: loss,
        lambda loss, metrics: (loss,),
        lambda loss, metrics: (loss, metrics),
        lambda loss, metrics: (loss, metrics, None),
        lambda loss, metrics: ll.LossOutput(loss, metrics),
    ],
    ids=["tensor", "1-tuple", "2-tuple", "3-tuple", "LossOutput"],
)
def test_every_loss_return_form_gives_the_same_update(wrap) -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)
    batch = regression_batch(6)
    base = ll.train_step(model, mse, opt)(ll.init(model, opt), batch)

    def loss_fn(m, b):
        return wrap(mse(m, b), {"extra": torch.tensor(1.0)})

    state = ll.train_step(model, loss_fn, opt)(ll.init(model, opt), batch)
    assert_trees_equal(state.params, base.params)
    assert_trees_equal(state.opt_state, base.opt_state)


def test_loss_metrics_are_detached_tensors_in_the_state() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)

    def loss_fn(m, b):
        out = m(b[0])
        return F.mse_loss(out, b[1]), {"mean_pred": out.mean(), "count": 3}

    state = ll.train_step(model, loss_fn, opt)(ll.init(model, opt), regression_batch(4))
    assert sorted(state.metrics) == ["count", "loss", "lr", "mean_pred", "weight"]
    assert isinstance(state.metrics["count"], torch.Tensor) and int(state.metrics["count"]) == 3
    assert not state.metrics["mean_pred"].requires_grad


def test_weight_function_and_loss_output_weight_set_the_weight() -> None:
    model = mlp()
    opt = ll.optim.sgd(0.1)
    batch = regression_batch(4)
    step = ll.train_step(model, mse, opt, weight=lambda b: 2 * len(b[0]))
    assert float(step(ll.init(model, opt), batch).metrics["weight"]) == 8

    def loss_fn(m, b):
        return ll.LossOutput(mse(m, b), weight=torch.tensor(11))

    step = ll.train_step(model, loss_fn, opt, weight=lambda b: 2 * len(b[0]))
    assert float(step(ll.init(model, opt), batch).metrics["weight"]) == 11


def test_step_repr_names_the_chain() -> None:
    model = mlp()
    step = ll.train_step(model, mse, ll.optim.sgd(0.1))
    assert repr(step) == "train_step(Sequential, mse)"
    wrapped = ll.chain(ll.accumulate(2), ll.clip(1.0))(step)
    assert repr(wrapped) == "chain(accumulate(2), clip(1.0))(train_step(Sequential, mse))"


# --------------------------------------------------------------------------- sample_count


@pytest.mark.parametrize(
    ("batch", "count"),
    [
        (torch.zeros(7, 2), 7),
        ((torch.zeros(3, 2), torch.zeros(3)), 3),
        ({"x": torch.zeros(5, 1), "y": torch.zeros(5)}, 5),
        ([torch.zeros(4, 2), torch.zeros(4)], 4),
        (([torch.zeros(5), torch.zeros(2), torch.zeros(1)], torch.zeros(3)), 3),
        ({"seqs": [torch.zeros(2, 1), torch.zeros(9, 1)]}, 2),
    ],
)
def test_sample_count(batch, count: int) -> None:
    assert ll.sample_count(batch) == count


@pytest.mark.parametrize("batch", [torch.tensor(1.0), (), {}, [], "abc", 3, (3, torch.zeros(2))])
def test_sample_count_rejects_batches_without_a_sample_axis(batch) -> None:
    with pytest.raises(
        ValueError, match=r"^train_step\(batch=.*\): batch must start with a tensor"
    ):
        ll.sample_count(batch)


# --------------------------------------------------------------------------- errors


def test_train_step_rejects_bad_arguments() -> None:
    model, opt = mlp(), ll.optim.sgd(0.1)
    with pytest.raises(
        TypeError,
        match=r"^train_step\(model='net'\): model must be a torch.nn.Module, got 'net'\.$",
    ):
        ll.train_step("net", mse, opt)
    with pytest.raises(
        TypeError,
        match=r"^train_step\(loss_fn=3\): loss_fn must be a function \(model, batch\) -> loss, got 3\.$",
    ):
        ll.train_step(model, 3, opt)
    with pytest.raises(
        TypeError,
        match=r"^train_step\(opt=<class 'torch.optim.sgd.SGD'>\): opt must be a looplib optimizer "
        r"such as ll.optim.adam\(1e-3\)",
    ):
        ll.train_step(model, mse, torch.optim.SGD)
    with pytest.raises(
        TypeError, match=r"^train_step\(weight=2\): weight must be a function batch -> number"
    ):
        ll.train_step(model, mse, opt, weight=2)


def test_init_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"^init\(model=None\): model must be a torch.nn.Module"):
        ll.init(None, ll.optim.sgd(0.1))
    with pytest.raises(
        TypeError,
        match=r"^init\(opt=\(1, 2\)\): opt must be a looplib optimizer such as "
        r"ll.optim.adam\(1e-3\), got \(1, 2\)\.$",
    ):
        ll.init(mlp(), (1, 2))


@pytest.mark.parametrize(
    ("seed", "exc"), [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("3", TypeError)]
)
def test_init_rejects_a_bad_seed(seed, exc) -> None:
    shown = repr(seed)
    with pytest.raises(
        exc,
        match="^"
        + re.escape(f"init(seed={shown}): seed must be a non-negative int, got {shown}.")
        + "$",
    ):
        ll.init(mlp(), ll.optim.sgd(0.1), seed=seed)


def test_step_rejects_a_state_that_is_not_a_train_state() -> None:
    model, opt = mlp(), ll.optim.sgd(0.1)
    step = ll.train_step(model, mse, opt)
    with pytest.raises(
        TypeError, match=r"^step\(state=\{\}\): state must be a looplib TrainState \(from ll.init\)"
    ):
        step({}, regression_batch(2))


def _run(loss_fn, batch=None):
    model, opt = mlp(), ll.optim.sgd(0.1)
    batch = regression_batch(3) if batch is None else batch
    return ll.train_step(model, loss_fn, opt)(ll.init(model, opt), batch)


def test_loss_must_be_a_scalar() -> None:
    with pytest.raises(
        TypeError,
        match=r"^train_step\(loss_fn=Tensor\(shape=\(3, 1\), dtype=torch.float64\)\): loss_fn must "
        r"return a scalar loss tensor, got Tensor\(shape=\(3, 1\), dtype=torch.float64\)\.$",
    ):
        _run(lambda m, b: (m(b[0]) - b[1]) ** 2)
    with pytest.raises(TypeError, match=r"loss_fn must return a scalar loss tensor, got 1\.5\.$"):
        _run(lambda m, b: (1.5, {}))


@pytest.mark.parametrize(
    "out",
    [{"loss": 1}, [1.0], (), (1, 2, 3, 4), None],
    ids=["dict", "list", "empty-tuple", "4-tuple", "None"],
)
def test_loss_with_a_wrong_return_type(out) -> None:
    def loss_fn(m, b):
        m(b[0])
        return out

    with pytest.raises(
        TypeError,
        match=r"^train_step\(loss_fn=.*\): loss_fn must return a loss tensor, \(loss, metrics\), "
        r"\(loss, metrics, carry\) or a LossOutput, got ",
    ):
        _run(loss_fn)


def test_loss_metrics_must_be_a_mapping() -> None:
    with pytest.raises(
        TypeError, match=r"loss_fn must return metrics as a dict of tensors, got \["
    ):
        _run(lambda m, b: (mse(m, b), [1.0]))


@pytest.mark.parametrize("key", ["loss", "weight"])
def test_loss_may_not_report_a_reserved_metric(key: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"^train_step\(loss_fn='{key}'\): loss_fn must not return a metric named 'loss' "
        rf"or 'weight' \(looplib reports those\), got '{key}'\.$",
    ):
        _run(lambda m, b: (mse(m, b), {key: torch.tensor(0.0)}))


def test_a_metric_must_be_a_one_element_tensor() -> None:
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "train_step(loss_fn=Tensor(shape=(3, 1), dtype=torch.float64)): loss_fn must return "
            "one-element metrics; metric 'per_sample' is not, got Tensor(shape=(3, 1), "
            "dtype=torch.float64)."
        )
        + "$",
    ):
        _run(lambda m, b: (mse(m, b), {"per_sample": m(b[0]).detach()}))


def test_metric_keys_may_not_change_between_steps() -> None:
    model, opt = mlp(), ll.optim.sgd(0.1)
    late = []

    def loss_fn(m, b):
        return mse(m, b), ({"late": torch.tensor(1.0)} if late else {})

    step = ll.train_step(model, loss_fn, opt)
    state = step(ll.init(model, opt), regression_batch(3))
    late.append(True)
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "train_step(Sequential, loss_fn): state.metrics['late'] appeared in the output "
            "(Tensor(shape=(), dtype=torch.float32)) but was not in the input. A step must return "
            "a state with exactly the structure, shapes and dtypes it received; check the "
            "transformer, optimizer or loss function that writes this entry."
        )
        + "$",
    ):
        step(state, regression_batch(3))


def test_a_detached_loss_is_an_error() -> None:
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "train_step(loss_fn=Tensor(shape=(), dtype=torch.float64)): loss_fn must return a "
            "loss computed from the model's parameters (it has no gradient: was it detached, or "
            "computed under torch.no_grad?), got Tensor(shape=(), dtype=torch.float64)."
        )
        + "$",
    ):
        _run(lambda m, b: mse(m, b).detach())
    with pytest.raises(ValueError, match=r"loss_fn must return a loss computed from the model"):
        _run(lambda m, b: F.mse_loss(b[1], torch.zeros_like(b[1])))


def _wrong_bias(state):
    return state._replace(params={**state.params, "0.bias": torch.zeros(5, dtype=torch.float64)})


def test_the_structure_check_runs_on_every_call() -> None:
    """A state whose params do not fit the model is caught on a later call too, after a normal
    one (the check is not a first-call-only check)."""
    model, opt = mlp(), ll.optim.sgd(0.1)
    step = ll.train_step(model, mse, opt)
    batch = regression_batch(3)
    state = step(ll.init(model, opt), batch)
    state = step(state, batch)
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "step(state=...): state.params['0.bias'] must have the model's shape (6,), got "
            "Tensor(shape=(5,), dtype=torch.float64). Was this state made by ll.init for another "
            "model?"
        )
        + "$",
    ):
        step(_wrong_bias(state), batch)
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "step(state=...): state.params['0.bias'] must have the model's shape (6,), got "
            "missing. Was this state made by ll.init for another model?"
        )
        + "$",
    ):
        step(state._replace(params={k: p for k, p in state.params.items() if k != "0.bias"}), batch)
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "step(state=...): state.params has entries the model does not: ['extra']. Was this "
            "state made by ll.init for another model?"
        )
        + "$",
    ):
        step(state._replace(params={**state.params, "extra": torch.zeros(1)}), batch)
    # ... and the step still works on a good state afterwards.
    assert int(step(state, batch).step) == 3


@pytest.mark.parametrize("func", ["fold", "scan"])
def test_fold_and_scan_check_the_state_naming_themselves(func: str) -> None:
    model, opt = mlp(), ll.optim.sgd(0.1)
    step = ll.train_step(model, mse, opt)
    batch = regression_batch(3)
    state = step(ll.init(model, opt), batch)
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(f"{func}(state=...): state.params['0.bias'] must have the model's shape (6,)"),
    ):
        getattr(ll, func)(step, _wrong_bias(state), [batch, batch])


def test_a_leaf_that_changes_dtype_between_calls_is_named_by_its_path() -> None:
    """Against the states seen before: the same containers with a leaf of another dtype."""
    model, opt = mlp(), ll.optim.sgd(0.1, momentum=0.9)
    step = ll.train_step(model, mse, opt)
    batch = regression_batch(3)
    state = step(ll.init(model, opt), batch)
    bad = state._replace(step=state.step.int())
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "step(state=...): state.step changed from Tensor(shape=(), dtype=torch.int64) "
            "to Tensor(shape=(), dtype=torch.int32). A step must return a state with "
            "exactly the structure, shapes and dtypes it received; check the transformer, "
            "optimizer or loss function that writes this entry."
        )
        + "$",
    ):
        step(bad, batch)
