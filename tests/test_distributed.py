"""Tests for looplib._distributed.

The oracle: two gloo processes, each training on its own (unequal) share of every batch, must
end with the parameters of one process trained on the concatenated batches. The workers are
top-level functions (spawn pickles them by name); they write their observations to a file, and
the assertions run here, in the parent. Every process group uses a short timeout and every
launch a hard deadline, so a broken rank fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import looplib as ll
from looplib._distributed import (
    NOT_INITIALIZED,
    agree,
    all_reduce_metrics,
    broadcast_state,
    check_same_state,
    is_main_process,
    pmean,
    shard,
    world,
)
from looplib._step import Micro

WORLD = 2
STEPS = 20  # optimizer updates
K = 2  # micro-batches per update on each rank
PG_TIMEOUT = timedelta(seconds=60)
DEADLINE_S = 120.0  # hard bound on one launch, in the parent
NORM = "grad_2.0_norm_total"


# ---------------------------------------------------------------------------------------------
# The shared problem: a small float64 MLP, a mean-reduced loss, data split unequally.


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).sum(-1).mean()


def make_opt() -> ll.Optimizer:
    return ll.optim.adam(lr=0.05)


def micro_batches() -> dict[int, list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """``data[t][r][j]``: update t, rank r, micro-batch j; sizes from 1 to 6, unequal."""
    gen = torch.Generator().manual_seed(1234)
    data: dict[int, list[list[tuple[torch.Tensor, torch.Tensor]]]] = {}
    for t in range(STEPS):
        data[t] = []
        for r in range(WORLD):
            row = []
            for j in range(K):
                n = 1 + (7 * t + 3 * r + 5 * j + r * j) % 6
                x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
                y = 4.0 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
                row.append((x, y))
            data[t].append(row)
    return data


def rank_stream(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = micro_batches()
    return [mb for t in range(STEPS) for mb in data[t][rank]]


def concatenated() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = micro_batches()
    out = []
    for t in range(STEPS):
        parts = [mb for r in range(WORLD) for mb in data[t][r]]
        out.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    return out


class CountAllReduce:
    """Counts ``torch.distributed.all_reduce`` calls while active (patched in the child)."""

    def __init__(self) -> None:
        self.calls = 0
        self._original: Callable[..., Any] = dist.all_reduce

    def __enter__(self) -> CountAllReduce:
        original = self._original

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce = self._original


# ---------------------------------------------------------------------------------------------
# Workers (run in the spawned children).


def _init(rank: int, world_size: int, init_method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=PG_TIMEOUT
    )


def _error_text(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return ""


def _train(chain: ll.Transformer, state: ll.TrainState) -> tuple[ll.TrainState, int]:
    model = make_model(0)
    step = chain(ll.train_step(model, loss_fn, make_opt()))
    with CountAllReduce() as counter:
        state = ll.fold(step, state, rank_stream(dist.get_rank()))
    return state, counter.calls


def worker_main(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    _init(rank, world_size, init_method)
    try:
        out: dict[str, Any] = {"world": world(), "main": is_main_process()}

        # Different starting points: check_same_state sees it, broadcast_state fixes it.
        own = ll.init(make_model(seed=rank), make_opt())
        own_before = {k: p.clone() for k, p in own.params.items()}
        out["differs"] = _error_text(lambda: check_same_state(own))
        state = broadcast_state(own)
        out["input_untouched"] = all(torch.equal(own.params[k], own_before[k]) for k in own_before)
        out["after_broadcast"] = _error_text(lambda: check_same_state(state))
        out["start"] = dict(state.params)

        # The oracle runs: accumulate then pmean (one all_reduce per update), and the reverse.
        chain_a = ll.chain(ll.accumulate(K), pmean(), ll.track_norm(2), ll.clip(1.0))
        final_a, out["calls_a"] = _train(chain_a, state)
        out["params_a"], out["norm_a"], out["steps_a"] = (
            final_a.params,
            final_a.metrics[NORM],
            int(final_a.step),
        )
        out["same_after_a"] = _error_text(lambda: check_same_state(final_a))
        chain_b = ll.chain(pmean(), ll.accumulate(K), ll.track_norm(2), ll.clip(1.0))
        final_b, out["calls_b"] = _train(chain_b, state)
        out["params_b"] = final_b.params
        out["loss_a"], out["loss_b"] = final_a.metrics["loss"], final_b.metrics["loss"]

        # pmean's stage alone: mixed dtypes, the exact weighted mean, the inputs untouched.
        gen = torch.Generator().manual_seed(100 + rank)
        grads = {
            "a": torch.randn(2, 3, generator=gen, dtype=torch.float64),
            "b": torch.randn(4, generator=gen),
            "c": torch.randn(5, generator=gen).to(torch.bfloat16),
        }
        weight = torch.tensor(3.0 if rank == 0 else 1.0)
        before = {k: g.clone() for k, g in grads.items()}
        seen: dict[str, Any] = {}

        def inner(s: ll.TrainState, micro: Micro) -> Any:
            seen.update(grads=micro.grads, weight=micro.weight, metrics=micro.metrics)
            return s

        stage = pmean()(ll.train_step(make_model(0), loss_fn, make_opt())).stages[0]
        loss = torch.tensor(1.0 + rank, dtype=torch.float64)
        with CountAllReduce() as counter:
            stage.wrap(inner)(state, Micro(grads, weight, {"loss": loss}))
        out["unit"] = {
            "grads_in": before,
            "untouched": all(torch.equal(grads[k], before[k]) for k in grads),
            "grads_out": seen["grads"],
            "weight_out": seen["weight"],
            "loss_out": seen["metrics"]["loss"],
            "calls": counter.calls,
        }

        # A group of one rank: pmean is the identity, with no collective at all.
        solo = dist.new_group([0])
        base = ll.train_step(make_model(0), loss_fn, make_opt())
        if rank == 0:
            with CountAllReduce() as counter:
                ours = ll.fold(pmean(group=solo)(base), state, rank_stream(0)[:3])
            plain = ll.fold(base, state, rank_stream(0)[:3])
            out["solo_equal"] = all(
                torch.equal(ours.params[k], plain.params[k]) for k in ours.params
            )
            out["solo_calls"] = counter.calls
        else:
            out["solo_error"] = _error_text(lambda: pmean(group=solo))

        # The epoch loop's helpers.
        out["shard"] = shard(list(range(7)))
        sums = {"loss": 2.0 * (rank + 1), "acc": torch.tensor(1.0 + rank)}
        out["metrics"] = all_reduce_metrics(sums, 4.0 if rank == 0 else 1.0)
        out["agree_one"] = agree(rank == 1)
        out["agree_none"] = agree(False)
        out["metric_names"] = _error_text(
            lambda: all_reduce_metrics({"loss" if rank == 0 else "lost": 1.0}, 1.0)
        )
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def worker_fails(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    _init(rank, world_size, init_method)
    state = ll.init(make_model(0), make_opt())
    step = pmean()(ll.train_step(make_model(0), loss_fn, make_opt()))
    stream = rank_stream(rank)
    if rank == 1:
        state = ll.fold(step, state, stream[:2])
        raise RuntimeError("rank 1 failed on purpose")
    try:  # rank 0 goes on, and must get an error (or be stopped), never hang
        ll.fold(step, state, stream)
    except Exception as e:
        Path(out_dir, "rank0_error.txt").write_text(f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# The launcher, in the parent.


def launch(worker: Callable[..., None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``worker(rank, WORLD, init_method, out_dir)`` on WORLD spawned processes."""
    # The children import this module by its name; make its root importable for them.
    depth = len(__name__.split("."))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[depth - 1]))
    rendezvous = tmp_path / f"rendezvous-{worker.__name__}"
    context = mp.start_processes(
        worker,
        args=(WORLD, f"file://{rendezvous}", str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{worker.__name__} did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp_path = tmp_path_factory.mktemp("distributed")
    with pytest.MonkeyPatch.context() as monkeypatch:
        launch(worker_main, tmp_path, monkeypatch)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference() -> ll.TrainState:
    """One process on the concatenated batches, the same chain without accumulate and pmean."""
    model = make_model(0)
    step = ll.chain(ll.track_norm(2), ll.clip(1.0))(ll.train_step(model, loss_fn, make_opt()))
    state, metrics = ll.scan(step, ll.init(model, make_opt()), concatenated())
    assert any(m[NORM] > 1.0 for m in metrics), "clip(1.0) never acted; the test is too weak"
    return state


# ---------------------------------------------------------------------------------------------
# Two processes against one.


@pytest.mark.parametrize("order", ["a", "b"])
def test_two_ranks_unequal_batches_match_one_process(results, reference, order):
    # a: chain(accumulate(2), pmean(), track_norm(2), clip(1.0)); b: pmean() first.
    for out in results:
        for name, expected in reference.params.items():
            torch.testing.assert_close(out[f"params_{order}"][name], expected)
    assert results[0]["steps_a"] == STEPS
    torch.testing.assert_close(results[0]["norm_a"], reference.metrics[NORM])
    # The metrics are reduced with the gradient: every rank reports the whole batch's loss,
    # not its own shard's.
    for out in results:
        torch.testing.assert_close(out[f"loss_{order}"], reference.metrics["loss"])


def test_ranks_are_bitwise_identical_after_training(results):
    for name, p in results[0]["params_a"].items():
        assert torch.equal(p, results[1]["params_a"][name])
    assert all(out["same_after_a"] == "" for out in results)


def test_one_all_reduce_per_update_after_accumulate(results):
    for out in results:
        assert out["calls_a"] == STEPS
        assert out["calls_b"] == STEPS * K  # pmean before accumulate: every micro-batch


def test_pmean_stage_is_the_weighted_mean_and_out_of_place(results):
    units = [out["unit"] for out in results]
    weights = [3.0, 1.0]
    for out in units:
        assert out["untouched"]
        assert out["calls"] == 2  # float64 bucket, float32 bucket (float32 + bfloat16)
        torch.testing.assert_close(out["weight_out"], torch.tensor(4.0))
        # The loss rides in the same reduction: the whole batch's loss on every rank.
        torch.testing.assert_close(
            out["loss_out"], torch.tensor((3.0 * 1.0 + 1.0 * 2.0) / 4.0, dtype=torch.float64)
        )
        for name, given_grad in units[0]["grads_in"].items():
            wide = sum(
                w * u["grads_in"][name].double() for w, u in zip(weights, units, strict=True)
            )
            expected = (wide / 4.0).to(given_grad.dtype)
            assert out["grads_out"][name].dtype == given_grad.dtype
            torch.testing.assert_close(out["grads_out"][name], expected)
    for name, g in units[0]["grads_out"].items():
        assert torch.equal(g, units[1]["grads_out"][name])


def test_group_of_one_is_the_identity(results):
    assert results[0]["solo_equal"]
    assert results[0]["solo_calls"] == 0
    assert "is not a member of the process group" in results[1]["solo_error"]


def test_broadcast_state_and_check_same_state(results):
    for rank, out in enumerate(results):
        assert out["differs"].startswith("ValueError: check_same_state(state): ")
        assert "state.params['0.weight'] differs across ranks" in out["differs"]
        assert out["after_broadcast"] == ""
        assert out["input_untouched"]
        start = ll.init(make_model(0), make_opt()).params
        for name, p in start.items():
            assert torch.equal(out["start"][name], p), (rank, name)


def test_helpers_across_ranks(results):
    assert [out["world"] for out in results] == [(0, 2), (1, 2)]
    assert [out["main"] for out in results] == [True, False]
    assert [out["shard"] for out in results] == [[0, 2, 4], [1, 3, 5]]
    for out in results:
        # loss: (2 + 4) / (4 + 1); acc: (1 + 2) / 5
        assert out["metrics"] == pytest.approx({"loss": 6.0 / 5.0, "acc": 3.0 / 5.0})
        assert out["agree_one"] is True
        assert out["agree_none"] is False
        assert "every rank must report the same metric names" in out["metric_names"]


def test_a_failing_rank_raises_instead_of_hanging(tmp_path, monkeypatch):
    start = time.monotonic()
    with pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)) as info:
        launch(worker_fails, tmp_path, monkeypatch)
    assert time.monotonic() - start < PG_TIMEOUT.total_seconds()
    # Which failure the launcher reports first is a race: rank 1's exception, or rank 0 being
    # aborted by gloo once its peer has gone. Either way the error surfaces and nothing hangs.
    if isinstance(info.value, mp.ProcessRaisedException):
        assert "rank 1 failed on purpose" in str(info.value)
    else:
        assert info.value.error_index == 0


# ---------------------------------------------------------------------------------------------
# One process, no process group.


def test_pmean_needs_a_process_group():
    model = make_model(0)
    step = pmean()(ll.train_step(model, loss_fn, make_opt()))
    message = NOT_INITIALIZED.format(func="pmean()")
    assert message == (
        "pmean(): torch.distributed is not initialized; call "
        "torch.distributed.init_process_group(...) or launch with torchrun."
    )
    with pytest.raises(RuntimeError, match=re.escape(message)):
        step(ll.init(model, make_opt()), rank_stream(0)[0])


def test_argument_errors():
    with pytest.raises(
        TypeError,
        match=re.escape(
            "pmean(group=3): group must be None (the default process group) or a "
            "torch.distributed ProcessGroup, got 3."
        ),
    ):
        pmean(group=3)
    with pytest.raises(TypeError, match=re.escape("shard(batches=")):
        shard(iter([1, 2]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be given together"):
        shard([1, 2], rank=0)
    with pytest.raises(
        ValueError, match=re.escape("shard(rank=2): rank must be less than world_size=2, got 2.")
    ):
        shard([1, 2], rank=2, world_size=2)
    with pytest.raises(TypeError, match=re.escape("agree(flag=1): flag must be a bool, got 1.")):
        agree(1)  # type: ignore[arg-type]
    state = ll.init(make_model(0), make_opt())
    with pytest.raises(ValueError, match=re.escape("check_same_state(fields=('nope',))")):
        check_same_state(state, fields=("nope",))
    with pytest.raises(ValueError, match=re.escape("broadcast_state(src=1): src must be a rank")):
        broadcast_state(state, src=1)


def test_single_process_helpers_are_the_identity():
    state = ll.init(make_model(0), make_opt())
    assert world() == (0, 1)
    assert is_main_process()
    assert broadcast_state(state) is state
    check_same_state(state)
    assert agree(True) and not agree(False)
    assert all_reduce_metrics({"loss": 3.0}, torch.tensor(2.0)) == {"loss": 1.5}
    assert (
        all_reduce_metrics({"loss": 0.0}, 0)["loss"] != all_reduce_metrics({"loss": 0.0}, 0)["loss"]
    )  # NaN for a zero weight


@settings(max_examples=200, deadline=None, derandomize=True)
@given(n=st.integers(0, 60), world_size=st.integers(1, 9))
def test_shard_partitions_the_kept_batches(n, world_size):
    batches = list(range(n))
    shards = [shard(batches, rank=r, world_size=world_size) for r in range(world_size)]
    kept = n // world_size * world_size
    assert all(len(s) == n // world_size for s in shards)
    flat = [b for s in shards for b in s]
    assert len(flat) == len(set(flat))  # disjoint
    assert sorted(flat) == batches[:kept]  # covers exactly the kept batches
    for r, s in enumerate(shards):
        assert s == batches[r:kept:world_size]


def test_shard_does_not_modify_its_input():
    batches = (torch.zeros(1), torch.ones(1), torch.full((1,), 2.0))
    out = shard(batches, rank=0, world_size=2)
    assert out[0] is batches[0] and len(batches) == 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
