"""ll.fit under torch.distributed: two gloo ranks train like one process on the joined batches.

Each rank gets every other batch of each epoch (``shard``); with ``pmean`` in the chain, one
update on the two ranks equals one update of a single process on the two batches joined. The
history (averaged over ranks) must match the single process, and early stopping must stop both
ranks at the same epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import looplib as ll
from tests.test_distributed import WORLD, _init, launch

EPOCHS = 12
BATCHES = 6  # per epoch, before sharding: 3 per rank


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    ).double()


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple:
    x, y = batch
    out = model(x)
    return (out - y).pow(2).mean(), {"mae": (out - y).abs().mean()}


def data() -> tuple[
    list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]
]:
    gen = torch.Generator().manual_seed(7)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
        return x, torch.stack([x.sum(-1).sin(), x[:, 0] * x[:, 1]], -1)

    return [batch(4) for _ in range(BATCHES)], [batch(6), batch(6)]


def chain() -> ll.Transformer:
    return ll.chain(ll.accumulate(2), ll.pmean(), ll.track_norm(2, per_param=False), ll.clip(1.0))


def stop() -> Any:
    # Small patience and a large min_delta, so early stopping fires within EPOCHS.
    return ll.early_stopping("val_loss", min_delta=0.02, patience=2)


class Stream:
    """Re-iterable but not a sequence, and no DistributedSampler: fit cannot shard it."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __iter__(self) -> Any:
        return iter(self.items)


def fit_worker(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    _init(rank, world_size, init_method)
    try:
        model, opt = make_model(), ll.optim.adam(0.05)
        if rank == 1:  # a different start: fit must broadcast rank 0's state
            torch.nn.init.zeros_(model[0].weight)
        train, val = data()
        step = chain()(ll.train_step(model, loss_fn, opt))
        ckpt = Path(out_dir) / "ckpt"
        result = ll.fit(
            step,
            ll.init(model, opt),
            train,
            val=val,
            max_epochs=EPOCHS,
            stop=stop(),
            progress=False,
            checkpoints=ll.Checkpoints(ckpt),
        )
        ll.check_same_state(result.state)
        try:
            ll.fit(step, result.state, Stream(train), progress=False)
            refused = ""
        except TypeError as e:
            refused = str(e)
        params = {k: v.tolist() for k, v in result.state.params.items()}
        report = {
            "history": result.history,
            "reason": result.stop_reason,
            "params": params,
            "refused": refused,
        }
        (Path(out_dir) / f"fit-{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_two_ranks_fit_like_one_process_and_stop_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launch(fit_worker, tmp_path, monkeypatch)
    reports = [json.loads((tmp_path / f"fit-{r}.json").read_text()) for r in range(WORLD)]

    # One process on the joined batches: rank 0 held batches 0, 2, 4 and rank 1 held 1, 3, 5.
    train, val = data()
    joined = [
        (torch.cat([train[i][0], train[i + 1][0]]), torch.cat([train[i][1], train[i + 1][1]]))
        for i in range(0, BATCHES, 2)
    ]
    model, opt = make_model(), ll.optim.adam(0.05)
    single_chain = ll.chain(ll.accumulate(2), ll.track_norm(2, per_param=False), ll.clip(1.0))
    step = single_chain(ll.train_step(model, loss_fn, opt))
    single = ll.fit(
        step, ll.init(model, opt), joined, val=val, max_epochs=EPOCHS, stop=stop(), progress=False
    )

    assert "no improvement" in single.stop_reason and len(single.history) < EPOCHS
    for report in reports:
        assert report["reason"] == single.stop_reason
        assert len(report["history"]) == len(single.history)
        for got, want in zip(report["history"], single.history, strict=True):
            assert got["step"] == want["step"] and got["batches"] == want["batches"]
            for key in ("loss", "mae", "grad_2.0_norm_total", "val_loss", "val_mae"):
                assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
        for key, value in report["params"].items():
            torch.testing.assert_close(
                torch.tensor(value, dtype=torch.float64), single.state.params[key]
            )
    untimed = [[{k: x for k, x in h.items() if k != "time"} for h in r["history"]] for r in reports]
    assert untimed[0] == untimed[1]
    # An iterable fit cannot shard is refused on every rank alike (nobody is left waiting).
    for report in reports:
        assert report["refused"].startswith("fit(train_batches=")
        assert "DistributedSampler" in report["refused"]
    # Only rank 0 wrote checkpoints, and the latest one resumes in a single process.
    latest = ll.latest_checkpoint(tmp_path / "ckpt")
    assert latest is not None
