"""ll.compile: one graph, no recompiles, same results as eager, a clean fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import looplib as ll


class CountingBackend:
    """A torch.compile backend that counts the graphs it is handed and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def batches(n: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 8, generator=g), torch.randint(0, 4, (size,), generator=g))
        for _ in range(n)
    ]


def assert_params_close(a: ll.TrainState, b: ll.TrainState) -> None:
    for key in a.params:
        torch.testing.assert_close(a.params[key], b.params[key], rtol=1e-5, atol=1e-6)


def features(model: nn.Module, opt: ll.Optimizer) -> ll.Step:
    return ll.chain(ll.accumulate(3), ll.track_norm(2), ll.clip(0.5))(ll.train_step(model, ce, opt))


def test_one_graph_and_no_recompile_across_accumulation_windows() -> None:
    model, opt = mlp(), ll.optim.adam(1e-2)
    backend = CountingBackend()
    compiled = ll.compile(features(model, opt), backend=backend)
    state = ll.fold(compiled, ll.init(model, opt), batches(10))
    assert not compiled.eager, compiled.error
    assert backend.graphs == 1
    assert int(state.step) == 3
    eager = ll.fold(features(model, opt), ll.init(model, opt), batches(10))
    assert_params_close(state, eager)
    for key in eager.metrics:
        torch.testing.assert_close(state.metrics[key], eager.metrics[key], rtol=1e-5, atol=1e-6)


def test_compiled_step_is_pure_and_keeps_the_structure() -> None:
    model, opt = mlp(), ll.optim.sgd(0.1, momentum=0.9)
    compiled = ll.compile(features(model, opt), backend=CountingBackend())
    state = compiled(ll.init(model, opt), batches(1)[0])
    snapshot = [(t, t.clone(), t._version) for t in torch.utils._pytree.tree_leaves(state)]
    after = compiled(state, batches(2)[1])
    for tensor, copy, version in snapshot:
        torch.testing.assert_close(tensor, copy, rtol=0, atol=0, equal_nan=True)
        assert tensor._version == version
    assert torch.utils._pytree.tree_structure(after) == torch.utils._pytree.tree_structure(state)


@pytest.mark.slow
def test_inductor_matches_eager_and_fit_accepts_a_compiled_step() -> None:
    model, opt = mlp(), ll.optim.adam(1e-2)
    compiled = ll.compile(features(model, opt))
    result = ll.fit(
        compiled, ll.init(model, opt), batches(6), val=batches(2), max_epochs=2, progress=False
    )
    assert not compiled.eager, compiled.error
    reference = ll.fit(
        features(model, opt),
        ll.init(model, opt),
        batches(6),
        val=batches(2),
        max_epochs=2,
        progress=False,
    )
    assert_params_close(result.state, reference.state)
    assert [h["step"] for h in result.history] == [h["step"] for h in reference.history]


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, carry: object) -> tuple[torch.Tensor, object]:
        out, carry = self.lstm(x, carry)
        return self.head(out), carry


def test_a_model_that_cannot_be_captured_falls_back_to_eager_with_one_warning() -> None:
    torch.manual_seed(0)
    model, opt = Recurrent(), ll.optim.sgd(0.1)

    def loss(m: nn.Module, batch: tuple, carry: object) -> tuple:
        x, y = batch
        logits, carry = m(x, carry)
        return F.cross_entropy(logits.reshape(-1, 2), y.reshape(-1)), {}, carry

    step = ll.tbptt_split(2)(ll.train_step(model, loss, opt))
    compiled = ll.compile(step, backend=CountingBackend())
    data = [(torch.randn(4, 6, 3), torch.randint(0, 2, (4, 6))) for _ in range(3)]
    with pytest.warns(RuntimeWarning, match="could not be captured as one graph") as record:
        state = ll.fold(compiled, ll.init(model, opt), data)
    assert len(record) == 1
    assert compiled.eager and compiled.error
    expected = ll.fold(step, ll.init(model, opt), data)
    assert all(torch.equal(state.params[k], expected.params[k]) for k in state.params)


def test_cuda_graph_modes_need_donation() -> None:
    step = ll.train_step(mlp(), ce, ll.optim.sgd(0.1))
    with pytest.raises(
        ValueError, match=r"^compile\(mode='reduce-overhead'\): mode uses CUDA graphs.*donate=True"
    ):
        ll.compile(step, mode="reduce-overhead")
    with pytest.raises(ValueError, match=r"^compile\(mode='fast'\): mode must be one of"):
        ll.compile(step, mode="fast")
    with pytest.raises(TypeError, match=r"^compile\(step=.*\): step must be a looplib Step"):
        ll.compile(lambda s, b: s)
    with pytest.raises(TypeError, match=r"^compile\(donate=1\): donate must be a bool"):
        ll.compile(step, donate=1)


def test_a_donating_step_is_refused() -> None:
    step = ll.donate(ll.train_step(mlp(), ce, ll.optim.sgd(0.1)))
    with pytest.raises(ValueError, match=r"^compile\(step=.*\): step must not be a donating step"):
        ll.compile(step)
