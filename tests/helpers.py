"""Builders and checkers shared by the core tests.

The checkers are written against ``optree`` and ``torch`` directly, never through looplib's own
tree helpers, so they can serve as independent oracles for purity and structure.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch import nn

import looplib as ll

# --------------------------------------------------------------------------- models and data


def mlp(
    in_features: int = 4,
    hidden: int = 6,
    out_features: int = 1,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    batchnorm: bool = False,
    dropout: float = 0.0,
) -> nn.Sequential:
    """A small MLP, reproducible from ``seed``; optional BatchNorm1d and Dropout layers."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(in_features, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, out_features))
    model = nn.Sequential(*layers).to(dtype)
    torch.random.set_rng_state(gen_state)
    return model


def regression_batch(
    n: int, in_features: int = 4, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=gen, dtype=dtype)
    y = torch.randn(n, 1, generator=gen, dtype=dtype)
    return x, y


def regression_batches(
    sizes: Sequence[int], in_features: int = 4, *, seed: int = 0, dtype=torch.float64
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        regression_batch(n, in_features, seed=seed + i, dtype=dtype) for i, n in enumerate(sizes)
    ]


def concat(batches: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """The concatenation of tensor batches along the sample axis."""
    return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def sequence_model(
    features: int = 3, hidden: int = 5, *, seed: int = 0, dtype=torch.float64
) -> nn.Module:
    """Per-time-step model for ``(B, T, F)`` inputs: Linear -> BatchNorm1d -> Tanh -> Dropout
    -> Linear, so any time chunk of a batch is a valid input (used under ``tbptt_split``)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = _PerStep(features, hidden).to(dtype)
    torch.random.set_rng_state(gen_state)
    return model


class _PerStep(nn.Module):
    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(0.25)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, f = x.shape
        h = self.inp(x.reshape(b * t, f))
        h = self.drop(torch.tanh(self.norm(h)))
        return self.out(h).reshape(b, t)


def sequence_loss(model: nn.Module, batch: Any, carry: Any = None) -> tuple[Any, ...]:
    """``(loss, metrics, carry)`` for ``(x: (B, T, F), y: (B, T))``; the carry counts chunks, so
    under ``tbptt_split`` it is threaded through (and ignored otherwise)."""
    x, y = batch
    pred = model(x)
    loss = F.mse_loss(pred, y)
    seen = torch.zeros((), dtype=x.dtype) if carry is None else carry
    return loss, {"abs_err": (pred - y).abs().mean()}, seen + 1


def sequence_batch(b: int = 4, t: int = 6, f: int = 3, *, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, t, f, generator=gen, dtype=dtype),
        torch.randn(b, t, generator=gen, dtype=dtype),
    )


def clone_module(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# --------------------------------------------------------------------------- purity


def snapshot(tree: Any) -> list[tuple[Any, torch.Tensor, int, torch.Tensor]]:
    """Every tensor leaf of ``tree`` with its path, a clone of its value and its ``_version``."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    return [
        (path, leaf.detach().clone(), leaf._version, leaf)
        for path, leaf in zip(paths, leaves, strict=True)
        if isinstance(leaf, torch.Tensor)
    ]


def assert_snapshot_unchanged(snap: list[tuple[Any, torch.Tensor, int, torch.Tensor]]) -> None:
    for path, before, version, leaf in snap:
        assert leaf._version == version, f"leaf {path} was written in place"
        assert leaf.dtype == before.dtype and leaf.shape == before.shape, f"leaf {path} changed"
        assert same_bits(leaf.detach(), before), f"leaf {path} changed value"


def assert_pure(step: Callable[[Any, Any], Any], state: Any, batch: Any) -> Any:
    """Run ``step(state, batch)`` and check that no tensor of ``state`` (or of the batch) changed
    value or was written in place; return the new state."""
    snap = snapshot(state)
    batch_snap = snapshot(batch)
    new = step(state, batch)
    assert_snapshot_unchanged(snap)
    assert_snapshot_unchanged(batch_snap)
    return new


# --------------------------------------------------------------------------- comparisons


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values (NaN equal to NaN), same dtype and shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def assert_same_structure(a: Any, b: Any) -> None:
    """Same treespec, and leafwise the same kind, shape and dtype."""
    la, sa = optree.tree_flatten(a, none_is_leaf=True)
    lb, sb = optree.tree_flatten(b, none_is_leaf=True)
    assert sa == sb, f"treespec changed:\n{sa}\n{sb}"
    for x, y in zip(la, lb, strict=True):
        assert isinstance(x, torch.Tensor) == isinstance(y, torch.Tensor)
        if isinstance(x, torch.Tensor):
            assert (x.shape, x.dtype, x.device) == (y.shape, y.dtype, y.device)


def assert_trees_equal(a: Any, b: Any) -> None:
    """Bit-identical pytrees (NaN equal to NaN)."""
    la, sa = optree.tree_flatten(a, none_is_leaf=True)
    lb, sb = optree.tree_flatten(b, none_is_leaf=True)
    assert sa == sb, f"treespec differs:\n{sa}\n{sb}"
    paths = optree.tree_paths(a, none_is_leaf=True)
    for path, x, y in zip(paths, la, lb, strict=True):
        if isinstance(x, torch.Tensor):
            assert same_bits(x, y), f"leaf {path} differs: {x} vs {y}"
        else:
            assert x == y, f"leaf {path} differs: {x!r} vs {y!r}"


def assert_trees_close(a: Any, b: Any, *, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    la, sa = optree.tree_flatten(a, none_is_leaf=True)
    lb, sb = optree.tree_flatten(b, none_is_leaf=True)
    assert sa == sb, f"treespec differs:\n{sa}\n{sb}"
    for x, y in zip(la, lb, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_params_close(
    state: ll.TrainState, model: nn.Module, *, rtol: float = 1e-10, atol: float = 1e-12
) -> None:
    """The state's params equal the module's parameters, by name."""
    ref = params_of(model)
    assert sorted(state.params) == sorted(ref)
    for name, p in ref.items():
        torch.testing.assert_close(state.params[name], p, rtol=rtol, atol=atol, msg=name)
