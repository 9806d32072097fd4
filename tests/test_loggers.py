"""Tests for ``ll.loggers`` and fit's per-step reads: every update logged, read in batches."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import looplib as ll


def setup():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = ll.optim.sgd(0.05)
    step = ll.track_norm(2, per_param=False)(
        ll.train_step(model, lambda m, b: (m(b[0]).squeeze(-1) - b[1]).pow(2).mean(), opt)
    )
    batches = [(torch.randn(4, 3), torch.randn(4)) for _ in range(7)]
    return step, ll.init(model, opt), batches


def test_every_update_is_logged_with_lr_and_grad_norms_read_every_log_every(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step, state, batches = setup()
    rows: list[tuple[int, dict[str, float]]] = []
    reads = {"n": 0}
    original = torch.Tensor.tolist

    def counted(self: torch.Tensor) -> list:
        reads["n"] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    log = ll.loggers.JSONL(tmp_path / "log.jsonl")
    result = ll.fit(step, state, batches, max_epochs=2, loggers=[log], log_every=3,
                    on_step=lambda s, values: rows.append((s, values)), progress=False)  # fmt: skip
    assert [s for s, _ in rows] == list(range(1, 15))  # every update, in order
    assert all(list(v) == ["loss", "lr", "grad_2.0_norm_total"] for _, v in rows)
    assert all(v["lr"] == pytest.approx(0.05) for _, v in rows)
    # Per epoch of 7 updates: reads after updates 3 and 6 and at the epoch's end, and one more
    # for the epoch's sums; none per update.
    assert reads["n"] == 2 * (3 + 1)
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "step"] == list(range(1, 15))
    epochs = [x for x in lines if x["kind"] == "epoch"]
    assert [{k: x for k, x in e.items() if k != "kind"} for e in epochs] == result.history
    steps = ll.fold(step, state, batches)
    assert rows[6][1]["loss"] == pytest.approx(float(steps.metrics["loss"]))


def test_csv_logger_long_form(tmp_path: Path) -> None:
    step, state, batches = setup()
    log = ll.loggers.CSV(tmp_path / "sub" / "log.csv")
    ll.fit(step, state, batches, max_epochs=1, loggers=[log], log_every=100, progress=False)
    with open(tmp_path / "sub" / "log.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["kind", "epoch", "step", "name", "value"]
    lr = [row for row in table if row[:4] == ["step", "", "1", "lr"]]
    assert len(lr) == 1 and float(lr[0][4]) == pytest.approx(0.05)
    names = {row[3] for row in table[1:] if row[0] == "epoch"}
    assert names == {"batches", "skipped", "loss", "lr", "grad_2.0_norm_total", "time"}
    ll.fit(step, state, batches, max_epochs=1, loggers=[log], progress=False)  # appends
    with open(tmp_path / "sub" / "log.csv", newline="") as f:
        again = list(csv.reader(f))
    assert again.count(table[0]) == 1 and len(again) == 2 * len(table) - 1


def test_tensorboard_logger(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    step, state, batches = setup()
    log = ll.loggers.TensorBoard(tmp_path / "tb")
    ll.fit(step, state, batches, max_epochs=2, loggers=[log], log_every=2, progress=False)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/loss", "step/lr", "step/grad_2.0_norm_total", "epoch/loss"} <= tags
    assert [e.step for e in events.Scalars("step/loss")] == list(range(1, 15))
    assert [e.step for e in events.Scalars("epoch/loss")] == [7, 14]


def test_a_bad_logger_is_refused_before_training() -> None:
    step, state, batches = setup()
    with pytest.raises(TypeError, match=r"^fit\(loggers\[1\]=3\): loggers\[1\] must be a logger"):
        ll.fit(step, state, batches, loggers=[ll.loggers.JSONL("x.jsonl"), 3])
    with pytest.raises(ValueError, match=r"^JSONL\(path='.*'\): path must be a file path, not a"):
        ll.loggers.JSONL(Path(__file__).parent)


def test_progress_bar_has_the_epoch_total_and_no_stray_bar(
    capsys: pytest.CaptureFixture[str],
) -> None:
    step, state, batches = setup()
    ll.fit(step, state, batches, max_epochs=2, progress=True)
    err = capsys.readouterr().err
    assert "0it [" not in err  # no bar without a total
    finals = [line for line in err.replace("\r", "\n").splitlines() if "7/7" in line]
    assert any("epoch 0" in x for x in finals) and any("epoch 1" in x for x in finals)
    ll.fit(step, state, batches, max_epochs=2)  # the default: a bar only on a terminal
    ll.fit(step, state, batches, max_epochs=2, progress=False)
    assert capsys.readouterr().err == ""
