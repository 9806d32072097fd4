"""The eager step's module swap agrees with torch.func.functional_call on awkward modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import looplib as ll
from looplib._swap import Swapper


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(x))


class Reassigns(nn.Module):
    """Replaces its buffer with a new tensor instead of writing into it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        return self.lin(x)


def test_tied_weights_get_one_gradient_from_both_uses() -> None:
    torch.manual_seed(0)
    model = Tied()
    assert len(dict(model.named_parameters())) == 1
    opt = ll.optim.sgd(0.1)
    x, y = torch.randint(0, 7, (5,)), torch.randint(0, 7, (5,))
    step = ll.train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), opt)
    out = step.gradient(ll.init(model, opt), (x, y))
    reference = Tied()
    reference.load_state_dict(model.state_dict())
    F.cross_entropy(reference(x), y).backward()
    torch.testing.assert_close(out.grads["embed.weight"], reference.embed.weight.grad)


def test_a_reassigned_buffer_comes_back_and_the_module_is_restored() -> None:
    model = Reassigns()
    original = model.calls
    swapper = Swapper(model)
    params = [p.detach().clone() for p in model.parameters()]
    result, buffers = swapper.call(params, [torch.tensor(5.0)], lambda: model(torch.ones(2, 3)))
    assert buffers[0].item() == 6.0
    assert model.calls is original and model.calls.item() == 0.0
    assert model.lin.weight is dict(model.named_parameters())["lin.weight"]
    expected = torch.func.functional_call(
        model, {"lin.weight": params[0], "lin.bias": params[1]}, (torch.ones(2, 3),)
    )
    torch.testing.assert_close(result, expected)


def test_a_parametrized_module_trains_like_functional_call() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 3)), nn.Tanh(), nn.Linear(3, 2))
    opt = ll.optim.sgd(0.05)
    step = ll.train_step(model, lambda m, b: m(b).pow(2).mean(), opt)
    x = torch.randn(6, 4)
    state = ll.init(model, opt)
    out = step.gradient(state, x)
    names = list(state.params)
    leaves = [state.params[n].detach().requires_grad_(True) for n in names]
    loss = (
        torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (x,)).pow(2).mean()
    )
    for name, grad in zip(names, torch.autograd.grad(loss, leaves), strict=True):
        torch.testing.assert_close(out.grads[name], grad)


def test_an_exception_in_the_loss_leaves_the_module_as_it_was() -> None:
    model = nn.Linear(2, 2)
    before = dict(model.named_parameters())

    def broken(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    step = ll.train_step(model, broken, ll.optim.sgd(0.1))
    with pytest.raises(RuntimeError, match="boom"):
        step(ll.init(model, ll.optim.sgd(0.1)), torch.ones(1, 2))
    assert dict(model.named_parameters()) == before
