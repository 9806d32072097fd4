"""Tests for looplib._overlap: ``pmean``'s all-reduce overlapped with the backward pass.

Oracles: the plain (non-overlapped) ``pmean(overlap=False)``, bit for bit where the reduction
computes the same products; one process on the joined batches. Two gloo processes, launched as
in tests/test_distributed.py; the workers record, the parent asserts. The overlap itself is
measured with timestamps: when each bucket's ``all_reduce`` was launched, against when
``torch.autograd.grad`` was entered and returned.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import looplib as ll
from looplib import _overlap
from looplib._distributed import pmean
from looplib._step import Backward
from tests import test_distributed
from tests.test_distributed import WORLD, _init, launch

STEPS = 6
K = 3


class Mixed(nn.Module):
    """Four layers in two dtypes: float64, float32, float32, float64 (buckets per dtype)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 16).double()
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)
        self.d = nn.Linear(16, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x)).float()
        h = torch.tanh(self.c(torch.tanh(self.b(h))))
        return self.d(h.double())


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
    x, y = batch
    err = model(x) - y
    return err.pow(2).sum(-1).mean(), {"mae": err.abs().mean().float()}


def rank_batches(rank: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Unequal batch sizes on the two ranks (weights 3..7)."""
    gen = torch.Generator().manual_seed(50 + rank)
    out = []
    for i in range(count):
        n = 3 + (i + 2 * rank) % 5
        out.append(
            (
                torch.randn(n, 6, generator=gen, dtype=torch.float64),
                torch.randn(n, 3, generator=gen, dtype=torch.float64),
            )
        )
    return out


def joined(count: int, group: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One process's batches: each ``group`` consecutive batches of both ranks, joined."""
    per_rank = [rank_batches(r, count) for r in range(WORLD)]
    out = []
    for t in range(0, count, group):
        parts = [b for r in range(WORLD) for b in per_rank[r][t : t + group]]
        out.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    return out


class Record:
    """While active: every ``dist.all_reduce`` call (time, async or not) and every
    ``torch.autograd.grad`` call (entered, returned), by ``time.perf_counter``."""

    def __init__(self) -> None:
        self.reduces: list[tuple[float, bool]] = []
        self.backwards: list[tuple[float, float]] = []

    def __enter__(self) -> Record:
        self._reduce, self._grad = dist.all_reduce, torch.autograd.grad
        reduce, grad = self._reduce, self._grad

        def all_reduce(*args: Any, **kwargs: Any) -> Any:
            self.reduces.append((time.perf_counter(), bool(kwargs.get("async_op", False))))
            return reduce(*args, **kwargs)

        def autograd_grad(*args: Any, **kwargs: Any) -> Any:
            entered = time.perf_counter()
            out = grad(*args, **kwargs)
            self.backwards.append((entered, time.perf_counter()))
            return out

        dist.all_reduce = all_reduce  # type: ignore[assignment]
        torch.autograd.grad = autograd_grad  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce = self._reduce  # type: ignore[assignment]
        torch.autograd.grad = self._grad  # type: ignore[assignment]


def _fold(chain: ll.Transformer, batches: list[Any]) -> tuple[ll.TrainState, Record]:
    model, opt = Mixed(), ll.optim.adam(0.05)
    step = chain(ll.train_step(model, loss_fn, opt))
    with Record() as record:
        state = ll.fold(step, ll.init(model, opt), batches)
    return state, record


def _summary(state: ll.TrainState, record: Record) -> dict[str, Any]:
    return {
        "params": state.params,
        "loss": state.metrics["loss"],
        "mae": state.metrics["mae"],
        "weight": state.metrics["weight"],
        "reduces": [a for _, a in record.reduces],
    }


# ---------------------------------------------------------------------------------------------
# Workers.


def worker_overlap(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    _init(rank, world_size, init_method)
    try:
        out: dict[str, Any] = {}
        plain_batches = rank_batches(rank, STEPS)
        # Without accumulate: one bucket, one bucket per layer-ish, the plain reduction.
        for key, chain in {
            "one": ll.chain(pmean()),
            "small": ll.chain(pmean(bucket_mb=1e-6)),
            "plain": ll.chain(pmean(overlap=False)),
        }.items():
            out[key] = _summary(*_fold(chain, plain_batches))
        # Under accumulate(K): only the closing micro-batch communicates.
        window_batches = rank_batches(rank, STEPS * K)
        for key, chain in {
            "acc_small": ll.chain(ll.accumulate(K), pmean(bucket_mb=1e-6)),
            "acc_plain": ll.chain(ll.accumulate(K), pmean(overlap=False)),
        }.items():
            out[key] = _summary(*_fold(chain, window_batches))
        # Where it falls back to the plain reduction after the backward pass.
        out["clip_first"] = _summary(
            *_fold(ll.chain(ll.clip(1.0), pmean(bucket_mb=1e-6)), plain_batches)
        )
        model, opt = Mixed(), ll.optim.adam(0.05)
        lone = ll.chain(ll.accumulate(2), pmean(bucket_mb=1e-6))(ll.train_step(model, loss_fn, opt))
        with Record() as record:
            state = ll.init(model, opt)
            for batch in plain_batches[:4]:  # step(state, batch): the position is a tensor
                state = lone(state, batch)
        out["lone"] = _summary(state, record)
        torch.save(out, os.path.join(out_dir, f"overlap{rank}.pt"))
    finally:
        dist.destroy_process_group()


def worker_compiled(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    _init(rank, world_size, init_method)
    try:
        torch.manual_seed(0)
        model, opt = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), ll.optim.sgd(0.1)
        batches = [(x.float(), y.float()) for x, y in rank_batches(rank, 3)]
        step = ll.chain(pmean(bucket_mb=1e-6))(ll.train_step(model, deep_loss, opt))
        # fullgraph=True: compiling at all means the all-reduce is in the graph.
        compiled = ll.fold(ll.compile(step), ll.init(model, opt), batches)
        eager = ll.fold(step, ll.init(model, opt), batches)
        torch.save(
            {"compiled": compiled.params, "eager": eager.params},
            os.path.join(out_dir, f"compiled{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def deep_model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(256, 256), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(256, 4))


def deep_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()


def worker_timeline(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    _init(rank, world_size, init_method)
    try:
        model, opt = deep_model(), ll.optim.sgd(0.01)
        # 256 x 256 float32 weights are 0.25 MB: about one layer per bucket.
        step = pmean(bucket_mb=0.3)(ll.train_step(model, deep_loss, opt))
        gen = torch.Generator().manual_seed(rank)
        batches = [(torch.randn(512, 256, generator=gen), torch.randn(512, 4, generator=gen))]
        state = ll.fold(step, ll.init(model, opt), batches)  # warm up
        with Record() as record:
            ll.fold(step, state, batches * 5)
        torch.save(
            {"reduces": record.reduces, "backwards": record.backwards},
            os.path.join(out_dir, f"timeline{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp_path = tmp_path_factory.mktemp("overlap")
    with pytest.MonkeyPatch.context() as monkeypatch:
        launch(worker_overlap, tmp_path, monkeypatch)
    return [torch.load(tmp_path / f"overlap{r}.pt", weights_only=True) for r in range(WORLD)]


def _buckets(bucket_mb: float) -> int:
    leaves = [p for _, p in Mixed().named_parameters()]
    plan = _overlap.plan(leaves, int(bucket_mb * _overlap.MB), lambda d: d)
    assert plan is not None
    return len(plan)


def _reference(batches: list[Any], k: int = 1) -> ll.TrainState:
    model, opt = Mixed(), ll.optim.adam(0.05)
    step = ll.chain(ll.accumulate(k))(ll.train_step(model, loss_fn, opt))
    return ll.fold(step, ll.init(model, opt), batches)


# ---------------------------------------------------------------------------------------------
# Two processes.


def test_overlapped_equals_plain_bit_for_bit(results):
    # Same products w * g, same dtypes, summed elementwise over two ranks: the same bits,
    # whatever the buckets.
    for out in results:
        for key in ("one", "small"):
            for name, p in out["plain"]["params"].items():
                assert torch.equal(out[key]["params"][name], p), (key, name)
            for metric in ("loss", "mae", "weight"):
                assert torch.equal(out[key][metric], out["plain"][metric]), (key, metric)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # One process sums the joined batch in another order; the float32 layers' rounding, which
    # Adam's normalised steps amplify, reaches the float64 layers too (the all-float64 oracle
    # runs in tests/test_distributed.py, on the overlapped path, at the default tolerance).
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_overlapped_equals_one_process_on_the_joined_batches(results):
    plain = _reference(joined(STEPS))
    window = _reference(joined(STEPS * K, K))
    for out in results:
        for name, expected in plain.params.items():
            _close(out["small"]["params"][name], expected)
        for name, expected in window.params.items():
            _close(out["acc_small"]["params"][name], expected)
            _close(out["acc_plain"]["params"][name], expected)
        torch.testing.assert_close(out["small"]["loss"], plain.metrics["loss"])
        torch.testing.assert_close(out["acc_small"]["loss"], window.metrics["loss"])
        torch.testing.assert_close(out["acc_small"]["mae"], window.metrics["mae"])
        torch.testing.assert_close(out["acc_small"]["weight"], window.metrics["weight"])
    for name, p in results[0]["acc_small"]["params"].items():
        assert torch.equal(p, results[1]["acc_small"]["params"][name])


def test_buckets_are_launched_asynchronously_once_per_update(results):
    small = _buckets(1e-6)
    assert small == 8  # every parameter its own bucket
    for out in results:
        assert out["one"]["reduces"] == [True] * (2 * STEPS)  # a float32 and a float64 bucket
        assert out["small"]["reduces"] == [True] * (small * STEPS)
        assert out["plain"]["reduces"] == [False] * (2 * STEPS)
        # accumulate(K) then pmean: only each window's closing micro-batch communicates.
        assert out["acc_small"]["reduces"] == [True] * (small * STEPS)
        assert out["acc_plain"]["reduces"] == [False] * (2 * STEPS)


def test_falls_back_to_the_plain_reduction(results):
    for out in results:
        # clip before pmean changes the gradient first: reduce after the backward pass.
        assert out["clip_first"]["reduces"] == [False] * (2 * STEPS)
        # A lone step(state, batch) under accumulate: the closing micro-batch is a tensor fact,
        # so pmean runs on every call (both branches of the select are computed).
        assert out["lone"]["reduces"] == [False] * (2 * 4)


@pytest.mark.slow
def test_compiled_pmean_matches_eager(tmp_path, monkeypatch):
    # Compiled, the reduction runs after the backward pass inside the graph (no hooks there).
    monkeypatch.setattr(test_distributed, "DEADLINE_S", 600.0)  # two cold compiles on 2 cores
    launch(worker_compiled, tmp_path, monkeypatch)
    for r in range(WORLD):
        out = torch.load(tmp_path / f"compiled{r}.pt", weights_only=True)
        for name, p in out["eager"].items():
            torch.testing.assert_close(out["compiled"][name], p)


def test_launches_happen_while_the_backward_pass_runs(tmp_path, monkeypatch):
    launch(worker_timeline, tmp_path, monkeypatch)
    leaves = [p for _, p in deep_model().named_parameters()]
    plan = _overlap.plan(leaves, int(0.3 * _overlap.MB), lambda d: d)
    # One per Linear (its weight and bias), the small last one sharing the one before it's.
    assert plan is not None and len(plan) == 8
    for r in range(WORLD):
        record = torch.load(tmp_path / f"timeline{r}.pt", weights_only=True)
        backwards, reduces = record["backwards"], record["reduces"]
        assert len(backwards) == 5 and len(reduces) == 5 * len(plan)
        firsts = []
        for i, (entered, returned) in enumerate(backwards):
            launches = [t for t, _ in reduces[i * len(plan) : (i + 1) * len(plan)]]
            assert all(a for _, a in reduces)
            # Every bucket is launched inside the backward pass, in order ...
            assert all(entered < t < returned for t in launches), (r, i)
            assert launches == sorted(launches)
            firsts.append((launches[0] - entered) / (returned - entered))
        # ... the first one early: its layer's gradient is among the first produced.
        assert sorted(firsts)[len(firsts) // 2] < 0.5, firsts


# ---------------------------------------------------------------------------------------------
# One process: the plan, the fallback rule, the arguments.


def test_plan_reverse_order_size_and_host():
    leaves = [
        torch.zeros(10, dtype=torch.float64),  # 80 bytes
        torch.zeros(10),  # 40 bytes
        torch.zeros(30, dtype=torch.float64),  # 240 bytes
        torch.zeros(5, dtype=torch.bfloat16),  # summed in float32: 20 bytes
        torch.zeros(10, dtype=torch.float64),
    ]
    plan = _overlap.plan(leaves, 100, lambda d: d)
    assert plan is not None
    assert [(b.params, b.dtype, b.host) for b in plan] == [
        ([4], torch.float64, False),
        ([2], torch.float64, False),  # 80 + 240 > 100: a new bucket (one too large, alone)
        ([1, 3], torch.float32, False),
        ([0], torch.float64, True),  # the last float64 bucket carries the weight
    ]
    complex_only = _overlap.plan([torch.zeros(2, dtype=torch.complex64)], 100, lambda d: d)
    assert complex_only is None


def test_overlap_only_where_the_gradient_reaches_pmean_unchanged():
    model, opt = Mixed(), ll.optim.sgd(0.1)
    base = ll.train_step(model, loss_fn, opt)
    state = ll.init(model, opt)

    def request(before: tuple, position: int | None) -> Backward:
        return Backward(state, position, before, [], [], torch.ones(()), {})

    acc3 = ll.accumulate(3)(base).stages
    acc1 = ll.accumulate(1)(base).stages
    clip = ll.clip(1.0)(base).stages
    assert _overlap.window(request((), None)) == (True, None)
    assert _overlap.window(request(acc1, None)) == (True, None)
    assert _overlap.window(request(clip, 0)) == (False, None)
    assert _overlap.window(request(acc3, None)) == (False, None)
    assert _overlap.window(request(acc3, 1)) == (False, None)  # the window is still open
    state = ll.chain(ll.accumulate(3))(base).init(state, rank_batches(0, 1)[0])
    can, sums = _overlap.window(Backward(state, 2, acc3, [], [], torch.ones(()), {}))
    assert can and sums is state.slots["accumulate"]


def test_pmean_arguments():
    assert repr(pmean()) == "pmean()"
    assert repr(pmean(bucket_mb=1, overlap=False)) == "pmean(bucket_mb=1, overlap=False)"
    with pytest.raises(
        ValueError,
        match=re.escape("pmean(bucket_mb=0): bucket_mb must be a positive real number, got 0."),
    ):
        pmean(bucket_mb=0)
    with pytest.raises(TypeError, match=re.escape("pmean(bucket_mb='25'): bucket_mb must be")):
        pmean(bucket_mb="25")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=re.escape("pmean(overlap=1): overlap must be a bool, got 1.")
    ):
        pmean(overlap=1)  # type: ignore[arg-type]
