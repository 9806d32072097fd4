"""ll.compile: one graph per update, no recompiles, the eager step's results, clear failures.

Most tests compile with ``aot_eager`` (the whole capture, fake tensors and the joint graph
included, without generating kernels) or a counting backend, which keeps them fast; the
``slow`` ones use inductor.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import looplib as ll


class CountingBackend:
    """A torch.compile backend that counts the graphs it is handed and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(16, 4))


def ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def batches(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in sizes]


def assert_states_close(a: ll.TrainState, b: ll.TrainState, tol: float = 1e-6) -> None:
    for key in a.params:
        torch.testing.assert_close(a.params[key], b.params[key], rtol=tol, atol=tol)
    for key in a.metrics:
        torch.testing.assert_close(
            a.metrics[key], b.metrics[key], rtol=tol, atol=tol, equal_nan=True
        )


def features(model: nn.Module, opt: ll.Optimizer) -> ll.Step:
    return ll.chain(ll.accumulate(3), ll.track_norm(2), ll.clip(0.5))(ll.train_step(model, ce, opt))


def test_one_graph_per_kind_of_update_and_no_recompile() -> None:
    """fold hands the compiled step whole windows: 10 batches in windows of 3 are three calls
    of one graph and a tail of one batch, a second graph; a second pass adds none."""
    model, opt = mlp(), ll.optim.adam(1e-2)
    backend = CountingBackend()
    compiled = ll.compile(features(model, opt), backend=backend)
    state = ll.fold(compiled, ll.init(model, opt, seed=0), batches([8] * 10))
    assert backend.graphs == 2
    assert int(state.step) == 3 and int(state.slots["accumulate"].count) == 1
    again = ll.fold(compiled, ll.init(model, opt, seed=0), batches([8] * 10))
    assert backend.graphs == 2
    eager = ll.fold(features(model, opt), ll.init(model, opt, seed=0), batches([8] * 10))
    assert_states_close(state, eager)
    assert_states_close(again, eager)


def test_a_smaller_last_batch_with_dropout_stays_compiled_and_matches_eager() -> None:
    """The case that used to drop a whole run to eager: dropout and a ragged last batch."""
    model, opt = mlp(dropout=0.3), ll.optim.adam(1e-2)
    step = ll.train_step(model, ce, opt)
    data = batches([32, 32, 16])
    compiled = ll.compile(step, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ll.fold(compiled, ll.init(model, opt, seed=4), data)
    assert not compiled.eager
    want = ll.fold(step, ll.init(model, opt, seed=4), data)
    # Same dropout masks: they are drawn from the state's key by plain tensor arithmetic.
    assert_states_close(got, want)


def test_a_lone_compiled_call_is_pure_and_equals_the_eager_call() -> None:
    model, opt = mlp(), ll.optim.sgd(0.1, momentum=0.9)
    compiled = ll.compile(features(model, opt), backend="aot_eager")
    start = ll.init(model, opt, seed=0)
    state = compiled(start, batches([8])[0])
    snapshot = [(t, t.clone(), t._version) for t in torch.utils._pytree.tree_leaves(state)]
    after = compiled(state, batches([8, 8])[1])
    for tensor, copy_, version in snapshot:
        torch.testing.assert_close(tensor, copy_, rtol=0, atol=0, equal_nan=True)
        assert tensor._version == version
    assert torch.utils._pytree.tree_structure(after) == torch.utils._pytree.tree_structure(state)
    eager = features(model, opt)
    assert_states_close(after, eager(eager(start, batches([8])[0]), batches([8, 8])[1]))


def test_a_donating_step_compiles_and_equals_the_pure_one() -> None:
    model, opt = mlp(), ll.optim.adam(1e-2)
    data = batches([8] * 6)
    got = ll.fold(
        ll.compile(ll.donate(features(model, opt)), backend="aot_eager"),
        ll.init(model, opt, seed=0),
        data,
    )
    assert_states_close(got, ll.fold(features(model, opt), ll.init(model, opt, seed=0), data))


def test_a_compiled_ensemble_equals_the_eager_ensemble() -> None:
    model, opt = mlp(dropout=0.2), ll.optim.adam(1e-2)
    step = ll.vmap(features(model, opt))
    data = batches([8] * 6)
    start = ll.stack(
        [features(model, opt).init(ll.init(model, opt, seed=s), data[0]) for s in range(3)]
    )
    got = ll.fold(ll.compile(step, backend="aot_eager"), start, data)
    assert_states_close(got, ll.fold(step, start, data), tol=1e-5)


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, carry: object) -> tuple[torch.Tensor, object]:
        out, carry = self.lstm(x, carry)
        return self.head(out), carry


def _recurrent_step() -> tuple[ll.Step, nn.Module, ll.Optimizer, list]:
    torch.manual_seed(0)
    model, opt = Recurrent(), ll.optim.sgd(0.1)

    def loss(m: nn.Module, batch: tuple, carry: object) -> tuple:
        x, y = batch
        logits, carry = m(x, carry)
        return F.cross_entropy(logits.reshape(-1, 2), y.reshape(-1)), {}, carry

    data = [(torch.randn(4, 6, 3), torch.randint(0, 2, (4, 6))) for _ in range(3)]
    return ll.tbptt_split(2)(ll.train_step(model, loss, opt)), model, opt, data


def test_a_step_that_cannot_be_captured_raises_with_the_reason_and_the_way_out() -> None:
    step, model, opt, data = _recurrent_step()
    compiled = ll.compile(step, backend=CountingBackend())
    with pytest.raises(
        ll.CompileError, match=r"cannot be captured as one graph\. The compiler said: "
    ) as info:
        ll.fold(compiled, ll.init(model, opt, seed=0), data)
    assert "fallback='eager'" in str(info.value)
    # No failure leaves the process unable to run the eager step.
    eager = ll.fold(step, ll.init(model, opt, seed=0), data)
    assert int(eager.step) == 9


def test_fallback_eager_warns_once_and_runs_the_eager_step() -> None:
    step, model, opt, data = _recurrent_step()
    compiled = ll.compile(step, backend=CountingBackend(), fallback="eager")
    with pytest.warns(RuntimeWarning, match="could not be captured as one graph") as record:
        state = ll.fold(compiled, ll.init(model, opt, seed=0), data)
        state = ll.fold(compiled, state, data)
    assert len(record) == 1
    assert compiled.eager and compiled.error
    expected = ll.fold(step, ll.fold(step, ll.init(model, opt, seed=0), data), data)
    assert all(torch.equal(state.params[k], expected.params[k]) for k in state.params)


def test_an_error_of_the_step_itself_is_reported_as_it_is() -> None:
    model, opt = mlp(), ll.optim.sgd(0.1)
    compiled = ll.compile(ll.train_step(model, ce, opt), backend="aot_eager")
    bad = (torch.randn(4, 5), torch.randint(0, 4, (4,)))  # 5 features for an 8-wide layer
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as info:
        ll.fold(compiled, ll.init(model, opt, seed=0), [bad])
    assert not isinstance(info.value, ll.CompileError)


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=False)
        return self.b(hidden)


def test_activation_checkpointing_gives_the_hand_loops_gradients_eager_and_compiled() -> None:
    """The recomputation in the backward pass runs on the state's params, not the module's."""
    torch.manual_seed(0)
    model = Checkpointed().double()
    g = torch.Generator().manual_seed(2)
    data = [
        (
            torch.randn(6, 4, generator=g, dtype=torch.float64),
            torch.randn(6, 1, generator=g, dtype=torch.float64),
        )
        for _ in range(5)
    ]

    def mse(m: nn.Module, batch: tuple) -> torch.Tensor:
        return F.mse_loss(m(batch[0]), batch[1])

    ref = copy.deepcopy(model)
    hand = torch.optim.SGD(ref.parameters(), lr=0.1)
    for batch in data:
        hand.zero_grad()
        mse(ref, batch).backward()
        hand.step()
    opt = ll.optim.sgd(0.1)
    step = ll.train_step(model, mse, opt)
    for run in (step, ll.compile(step, backend="aot_eager")):
        state = ll.fold(run, ll.init(model, opt, seed=0), data)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-12, atol=1e-12)


def test_dropout_inside_a_checkpointed_block_is_refused() -> None:
    class Random(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint(lambda t: F.dropout(self.a(t), 0.5), x, use_reentrant=False)

    opt = ll.optim.sgd(0.1)
    step = ll.train_step(Random(), lambda m, b: m(b).pow(2).mean(), opt)
    with pytest.raises(NotImplementedError, match="activation-checkpointed block"):
        step(ll.init(Random(), opt), torch.randn(3, 4))


def test_cuda_graph_modes_need_donation_and_arguments_are_checked() -> None:
    step = ll.train_step(mlp(), ce, ll.optim.sgd(0.1))
    with pytest.raises(
        ValueError, match=r"^compile\(mode='reduce-overhead'\): mode uses CUDA graphs.*donate=True"
    ):
        ll.compile(step, mode="reduce-overhead")
    with pytest.raises(ValueError, match=r"^compile\(mode='fast'\): mode must be one of"):
        ll.compile(step, mode="fast")
    with pytest.raises(ValueError, match=r"^compile\(fallback='quiet'\): fallback must be one of"):
        ll.compile(step, fallback="quiet")
    with pytest.raises(TypeError, match=r"^compile\(step=.*\): step must be a looplib Step"):
        ll.compile(lambda s, b: s)
    with pytest.raises(TypeError, match=r"^compile\(donate=1\): donate must be a bool"):
        ll.compile(step, donate=1)


@pytest.mark.slow
def test_inductor_matches_eager_and_fit_accepts_a_compiled_step() -> None:
    model, opt = mlp(dropout=0.1), ll.optim.adam(1e-2)
    compiled = ll.compile(features(model, opt))
    data = batches([8, 8, 8, 8, 8, 4])
    result = ll.fit(
        compiled,
        ll.init(model, opt, seed=0),
        data,
        val=batches([8, 8]),
        max_epochs=2,
        progress=False,
    )
    assert not compiled.eager, compiled.error
    reference = ll.fit(
        features(model, opt),
        ll.init(model, opt, seed=0),
        data,
        val=batches([8, 8]),
        max_epochs=2,
        progress=False,
    )
    assert_states_close(result.state, reference.state, tol=1e-5)
    assert [h["step"] for h in result.history] == [h["step"] for h in reference.history]
