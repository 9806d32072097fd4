"""CUDA checks: the pure step, compilation, CUDA graphs, sync-free steps and ensembles on a GPU.

Skipped without CUDA (CI has none); run on a lent GPU machine.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import looplib as ll

pytestmark = [
    pytest.mark.gpu,
    # The compiler's own advice to enable TF32; these tests compare in full float32.
    pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores:UserWarning"),
    # cuDNN's note that an RNN runs on weights it did not allocate as one chunk: it copies them
    # each call, as for any module run on tensors other than its own (functional_call alike).
    pytest.mark.filterwarnings("ignore:RNN module weights are not part of single contiguous"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = "cuda"


def mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(32, 64), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(64, 10)).to(DEVICE)


def ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def batches(n: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device=DEVICE).manual_seed(1)
    return [
        (
            torch.randn(size, 32, device=DEVICE, generator=g),
            torch.randint(0, 10, (size,), device=DEVICE, generator=g),
        )
        for _ in range(n)
    ]


def close(a: ll.TrainState, b: ll.TrainState, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    for key in a.params:
        torch.testing.assert_close(a.params[key], b.params[key], rtol=rtol, atol=atol)


def features(model: nn.Module, opt: ll.Optimizer) -> ll.Step:
    chain = ll.chain(ll.skip_nonfinite(3), ll.accumulate(2), ll.track_norm(2), ll.clip(1.0))
    return chain(ll.train_step(model, ce, opt))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, carry: object) -> tuple[torch.Tensor, object]:
        out, carry = self.lstm(x, carry)
        return self.head(out), carry


def lstm_loss(model: nn.Module, batch: tuple, carry: object) -> tuple:
    x, y = batch
    logits, carry = model(x, carry)
    return F.cross_entropy(logits.reshape(-1, 4), y.reshape(-1)), {}, carry


def test_the_pure_step_runs_cudnn_lstm_under_tbptt_like_an_imperative_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # cuDNN runs RNN matmuls in TF32 by default; compare in full float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = Recurrent().to(DEVICE)
    reference = copy.deepcopy(model)
    opt = ll.optim.adam(1e-2)
    step = ll.tbptt_split(4)(ll.train_step(model, lstm_loss, opt))
    data = [
        (torch.randn(4, 12, 8, device=DEVICE), torch.randint(0, 4, (4, 12), device=DEVICE))
        for _ in range(3)
    ]
    state = ll.fold(step, ll.init(model, opt), data)
    torch_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for x, y in data:
        carry = None
        for t in range(0, 12, 4):
            loss, _, carry = lstm_loss(reference, (x[:, t : t + 4], y[:, t : t + 4]), carry)
            torch_opt.zero_grad()
            loss.backward()
            torch_opt.step()
            carry = tuple(h.detach() for h in carry)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state.params[name], p, rtol=1e-4, atol=1e-5)
    assert int(state.step) == 9 and state.params["head.weight"].is_cuda


@pytest.mark.parametrize(
    "opt",
    [
        ll.optim.adam(1e-2),
        ll.optim.adamw(1e-2, weight_decay=0.1),
        ll.optim.sgd(0.1, momentum=0.9, nesterov=True),
        ll.optim.rmsprop(1e-2, centered=True, momentum=0.5),
        ll.optim.lion(1e-3),
    ],
    ids=["adam", "adamw", "sgd-nesterov", "rmsprop", "lion"],
)
def test_a_step_never_synchronizes_with_the_host(opt: ll.Optimizer) -> None:
    """Accumulation, clipping, norm tracking, skipping, dropout and the optimizer, eager, with
    CUDA's sync debug mode set to raise: no host read anywhere in the step."""
    model = mlp(dropout=0.2)
    step = features(model, opt)
    data = batches(4)
    state = step.init(ll.init(model, opt, seed=0), data[0])
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings():  # torch calls the mode a prototype
            warnings.simplefilter("ignore")
            torch.cuda.set_sync_debug_mode("error")
        state = step.run(state, data[:2], start=0, donate=True)  # a whole window, as fold does
        state = step(state, data[2])  # a lone call: the window closes by a tensor select
        state = step(state, data[3])
        state = step.flush(state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(state.step) == 2


def test_compiled_step_with_dropout_matches_eager_on_cuda() -> None:
    model, opt = mlp(dropout=0.1), ll.optim.adam(1e-2)
    compiled = ll.compile(features(model, opt))
    data = batches(7)  # three windows and a tail of one
    got = ll.fold(compiled, ll.init(model, opt, seed=0), data)
    # Inductor's kernels reassociate sums; Adam magnifies the last bits over a few updates.
    expected = ll.fold(features(model, opt), ll.init(model, opt, seed=0), data)
    close(got, expected, rtol=1e-4, atol=1e-5)


def test_cuda_graphs_with_donation_match_eager_whole_windows_and_lone_calls() -> None:
    model, opt = mlp(dropout=0.1), ll.optim.adam(1e-2)
    data = batches(9, size=16)
    expected = ll.fold(features(model, opt), ll.init(model, opt, seed=0), data)
    graphed = ll.compile(features(model, opt), mode="reduce-overhead", donate=True)
    got = ll.fold(graphed, ll.init(model, opt, seed=0), data)  # whole windows, then a tail
    assert not graphed.eager, graphed.error
    close(got, expected, rtol=1e-4, atol=1e-5)
    assert int(got.step) == int(expected.step) == 4
    lone = ll.compile(features(model, opt), mode="reduce-overhead", donate=True)
    state = ll.init(model, opt, seed=0)
    for batch in data:
        state = lone(state, batch)  # each state is used once: donated
    close(state, expected, rtol=1e-4, atol=1e-5)


def test_a_cudnn_lstm_cannot_be_captured_raises_and_falls_back_when_asked() -> None:
    torch.manual_seed(0)
    model, opt = Recurrent().to(DEVICE), ll.optim.sgd(0.1)
    step = ll.tbptt_split(4)(ll.train_step(model, lstm_loss, opt))
    data = [(torch.randn(4, 8, 8, device=DEVICE), torch.randint(0, 4, (4, 8), device=DEVICE))]
    with pytest.raises(ll.CompileError, match="fallback='eager'"):
        ll.fold(ll.compile(step), ll.init(model, opt, seed=0), data)
    compiled = ll.compile(step, fallback="eager")
    with pytest.warns(RuntimeWarning, match="could not be captured") as record:
        state = ll.fold(compiled, ll.init(model, opt, seed=0), data * 2)
    assert len(record) == 1
    close(state, ll.fold(step, ll.init(model, opt, seed=0), data * 2), rtol=0, atol=0)


def test_dropout_on_cuda_is_a_function_of_the_state() -> None:
    model = mlp(dropout=0.5)
    opt = ll.optim.sgd(0.1)
    step = ll.train_step(model, ce, opt)
    start = ll.init(model, opt, seed=3)
    a = ll.fold(step, start, batches(4))
    torch.cuda.manual_seed(123)  # the global generator does not matter
    b = ll.fold(step, ll.fold(step, start, batches(4)[:2]), batches(4)[2:])
    close(a, b, rtol=0, atol=0)


def test_an_ensemble_on_cuda_equals_separate_runs() -> None:
    model, opt = mlp(dropout=0.1), ll.optim.adam(1e-2)
    step = features(model, opt)
    data = batches(6)
    states = [step.init(ll.init(model, opt, seed=s), data[0]) for s in range(4)]
    together = ll.unstack(ll.fold(ll.vmap(step), ll.stack(states), data))
    for member, start in zip(together, states, strict=True):
        close(member, ll.fold(step, start, data), rtol=1e-4, atol=1e-5)


def test_fit_on_cuda() -> None:
    model, opt = mlp(), ll.optim.adamw(1e-2)
    step = ll.chain(ll.accumulate(2), ll.track_norm(2), ll.clip(1.0))(ll.train_step(model, ce, opt))
    result = ll.fit(
        step, ll.init(model, opt), batches(8), val=batches(2), max_epochs=3, progress=False
    )
    assert len(result.history) == 3 and result.state.params["0.weight"].is_cuda
