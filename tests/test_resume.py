"""Bit-exact resume: saving the state is resuming training.

The law, for a step and any ``k <= n``::

    fold(step, s, xs[:n]) == fold(step, load(save(fold(step, s, xs[:k]))), xs[k:n])

leaf for leaf, bit for bit, with the load and the last ``n - k`` steps run in a fresh Python
process (so nothing survives in module globals, torch's generators or the step object). The
chains are drawn by hypothesis: mid accumulation window, dropout drawing from ``init(seed=)``'s
generator in the state, BatchNorm buffers, truncated BPTT on an LSTM, skipped non-finite steps,
SGD with momentum, Adam and AdamW.

At the level of ``fit``: a run interrupted at any call of the loss and called again with the same
checkpoint directory ends with the same state and history (all but ``time``) as an uninterrupted
run, with data reshuffled every epoch and dropout drawing from torch's global generator; a
finished run stays finished; rotation keeps the right files; a non-finite loss saves the last
good state; a damaged checkpoint is reported, never silently ignored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import looplib as ll

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the child process imports this module by name
    sys.path.insert(0, str(ROOT))

from tests.helpers import assert_trees_equal, mlp  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _no_fsync() -> Any:
    """fsync makes checkpoints durable (tested in test_checkpoint.py); here it only costs time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        yield


# ------------------------------------------------------------------------- step-level scenarios
# A scenario is a JSON dict, so that a child process can rebuild the same step and batches:
#   model: "mlp" | "bn" | "dropout" | "lstm";  opt: "sgd" | "momentum" | "adam" | "adamw"
#   chain: [[name, *args], ...] in chain order;  seed: int or None (ll.init(seed=))
#   sizes: the batch sizes (n = len(sizes));  bad: indices of batches holding a NaN


class _Rnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor, carry: Any = None) -> tuple[torch.Tensor, Any]:
        out, carry = self.lstm(x, carry)
        return self.head(out).squeeze(-1), carry


def rnn_loss(model: nn.Module, batch: Any, carry: Any = None) -> tuple[Any, ...]:
    x, y = batch
    pred, carry = model(x, carry)
    return F.mse_loss(pred, y), {"abs_err": (pred - y).abs().mean()}, carry


def mse_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def _model(kind: str) -> nn.Module:
    if kind == "lstm":
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        model = _Rnn().double()
        torch.random.set_rng_state(state)
        return model
    return mlp(batchnorm=kind == "bn", dropout=0.3 if kind == "dropout" else 0.0)


_OPTS: dict[str, Callable[[], ll.Optimizer]] = {
    "sgd": lambda: ll.optim.sgd(0.05),
    "momentum": lambda: ll.optim.sgd(0.05, momentum=0.9),
    "adam": lambda: ll.optim.adam(0.01),
    "adamw": lambda: ll.optim.adamw(0.01, weight_decay=0.1),
}

_TRANSFORMERS: dict[str, Callable[..., ll.Transformer]] = {
    "accumulate": lambda k, partial: ll.accumulate(k, partial=partial),
    "clip": ll.clip,
    "track_norm": ll.track_norm,
    "skip_nonfinite": ll.skip_nonfinite,
    "tbptt_split": ll.tbptt_split,
}


def _batches(spec: dict[str, Any]) -> list[Any]:
    gen = torch.Generator().manual_seed(1234)
    out = []
    for i, size in enumerate(spec["sizes"]):
        if spec["model"] == "lstm":
            x = torch.randn(size, 9, 3, generator=gen, dtype=torch.float64)
            y = torch.randn(size, 9, generator=gen, dtype=torch.float64)
        else:
            x = torch.randn(size, 4, generator=gen, dtype=torch.float64)
            y = torch.randn(size, 1, generator=gen, dtype=torch.float64)
        if i in spec["bad"]:
            # In the target's last time step: under tbptt_split only the last chunk is bad
            # (a NaN input would also poison the carry, and so every later chunk).
            y[0, -1] = float("nan")
        out.append((x, y))
    return out


def build(spec: dict[str, Any]) -> tuple[ll.Step, ll.TrainState, list[Any]]:
    """The step, the initial state and the batches of a scenario."""
    model = _model(spec["model"])
    opt = _OPTS[spec["opt"]]()
    loss = rnn_loss if spec["model"] == "lstm" else mse_loss
    step = ll.train_step(model, loss, opt)
    if spec["chain"]:
        chain = ll.chain(*(_TRANSFORMERS[name](*args) for name, *args in spec["chain"]))
        step = chain(step)
    return step, ll.init(model, opt, seed=spec["seed"]), _batches(spec)


def run(step: ll.Step, state: ll.TrainState, batches: list[Any]) -> ll.TrainState:
    for batch in batches:
        state = step(state, batch)
    return state


def continue_jobs(jobs_file: str) -> None:
    """The child process: load each job's checkpoint, run the remaining batches, save."""
    for job in json.loads(Path(jobs_file).read_text()):
        step, _, batches = build(job["spec"])
        state = ll.load(job["saved"])
        ll.save(run(step, state, batches[job["k"] :]), job["out"])


_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); import tests.test_resume as t; t.continue_jobs(sys.argv[2])"


def check_resume_in_fresh_process(cases: list[tuple[dict[str, Any], list[int]]], tmp: Path) -> None:
    """For each ``(spec, ks)``: train k steps here and save, continue in one child process for
    all cases, and compare with n uninterrupted steps."""
    jobs, expected = [], []
    for i, (spec, ks) in enumerate(cases):
        step, state, batches = build(spec)
        full = run(step, state, batches)
        for k in sorted(set(ks)):
            saved, out = tmp / f"{i}-{k}-saved.ll", tmp / f"{i}-{k}-out.ll"
            ll.save(run(step, state, batches[:k]), saved)
            jobs.append({"spec": spec, "k": k, "saved": str(saved), "out": str(out)})
            expected.append((spec, k, full))
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ROOT), str(tmp / "jobs.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for job, (spec, k, full) in zip(jobs, expected, strict=True):
        resumed = ll.load(job["out"])
        try:
            assert_trees_equal(resumed, full)
        except AssertionError as e:
            raise AssertionError(f"resume at k={k} of {spec}: {e}") from None


def scenario(
    model: str = "mlp",
    opt: str = "sgd",
    chain: list[list[Any]] | None = None,
    *,
    n: int = 7,
    seed: int | None = None,
    bad: tuple[int, ...] = (),
    sizes: list[int] | None = None,
) -> dict[str, Any]:
    sizes = sizes if sizes is not None else [2 + (3 * i) % 4 for i in range(n)]
    return {
        "model": model,
        "opt": opt,
        "chain": chain or [],
        "seed": seed,
        "sizes": sizes,
        "bad": list(bad),
    }


NAMED = {
    "accumulate(3) mid-window, sgd momentum": scenario(
        "mlp", "momentum", [["accumulate", 3, "step"]]
    ),
    "dropout from init(seed=), adam": scenario(
        "dropout", "adam", [["accumulate", 2, "carry"], ["clip", 0.5, 2.0]], seed=7
    ),
    "BatchNorm buffers, adamw, track_norm": scenario(
        "bn", "adamw", [["track_norm", 2.0], ["clip", 1.0, 2.0]]
    ),
    "LSTM, chain(tbptt_split(4), accumulate(2))": scenario(
        "lstm", "adam", [["tbptt_split", 4], ["accumulate", 2, "step"]], n=5
    ),
    "skipped NaN batches under accumulate": scenario(
        "mlp",
        "momentum",
        [["skip_nonfinite", 2], ["accumulate", 2, "step"], ["track_norm", "inf"]],
        bad=(1, 4),
    ),
    "no transformer, seeded dropout, sgd": scenario("dropout", "sgd", seed=3, n=4),
}


def test_named_scenarios_resume_bit_exactly_at_every_k(tmp_path: Path) -> None:
    cases = [(spec, list(range(len(spec["sizes"]) + 1))) for spec in NAMED.values()]
    check_resume_in_fresh_process(cases, tmp_path)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    """A random valid chain over a random small model."""
    model = draw(st.sampled_from(["mlp", "bn", "dropout", "lstm"]))
    chain: list[list[Any]] = []
    if model == "lstm" and draw(st.booleans()):
        chain.append(["tbptt_split", draw(st.integers(2, 5))])
    options = {
        "accumulate": [
            "accumulate",
            draw(st.integers(1, 4)),
            draw(st.sampled_from(["step", "drop", "carry"])),
        ],
        "clip": ["clip", draw(st.sampled_from([0.05, 0.5, float("inf")])), 2.0],
        "track_norm": ["track_norm", draw(st.sampled_from([1.0, 2.0, "inf"]))],
        "skip_nonfinite": ["skip_nonfinite", draw(st.integers(2, 4))],
    }
    names = draw(st.lists(st.sampled_from(sorted(options)), unique=True, max_size=4))
    chain += [options[name] for name in names]
    n = draw(st.integers(1, 7))
    sizes = draw(st.lists(st.integers(2, 5), min_size=n, max_size=n))
    bad: list[int] = []
    if "skip_nonfinite" in names and n > 1:
        bad = [draw(st.integers(0, n - 1))]
    seed = draw(st.one_of(st.none(), st.integers(0, 2**31)))
    if model == "dropout" and seed is None:
        seed = 1  # dropout must draw from the state's generator for a fresh process to resume
    opt = draw(st.sampled_from(sorted(_OPTS)))
    return {"model": model, "opt": opt, "chain": chain, "seed": seed, "sizes": sizes, "bad": bad}


@settings(max_examples=2)
@given(st.lists(st.tuples(scenarios(), st.data()), min_size=6, max_size=8))
def test_random_chains_resume_bit_exactly_in_a_fresh_process(
    tmp_path_factory: pytest.TempPathFactory, drawn: list[tuple[dict[str, Any], Any]]
) -> None:
    cases = []
    for spec, data in drawn:
        n = len(spec["sizes"])
        cases.append((spec, data.draw(st.lists(st.integers(0, n), min_size=1, max_size=3))))
    check_resume_in_fresh_process(cases, tmp_path_factory.mktemp("resume"))


@given(scenarios(), st.data())
def test_random_chains_resume_bit_exactly_in_process(
    tmp_path_factory: pytest.TempPathFactory, spec: dict[str, Any], data: Any
) -> None:
    """The same law in this process, for many more draws (save and load through a file)."""
    step, state, batches = build(spec)
    k = data.draw(st.integers(0, len(batches)))
    path = tmp_path_factory.mktemp("inproc") / "state.ll"
    ll.save(run(step, state, batches[:k]), path)
    # A fresh step object too: nothing may hide in the step between calls.
    fresh_step, _, _ = build(spec)
    assert_trees_equal(run(fresh_step, ll.load(path), batches[k:]), run(step, state, batches))


# ------------------------------------------------------------------------------ fit-level resume
N_SAMPLES, BATCH = 26, 6  # 5 batches an epoch, the last one of 2 samples


class Loss:
    """The training loss, with faults to inject: ``interrupt_at`` (1-based calls of any kind)
    raise KeyboardInterrupt once each, ``nan_at`` (1-based training calls) return NaN once."""

    def __init__(self, interrupt_at: tuple[int, ...] = (), nan_at: tuple[int, ...] = ()) -> None:
        self.calls = 0
        self.train_calls = 0
        self.interrupt_at = set(interrupt_at)
        self.nan_at = set(nan_at)

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if model.training and not torch.is_grad_enabled():
            # The step's no-grad probe of the loss before its first update: not a call here.
            return F.mse_loss(model(batch[0]), batch[1])
        self.calls += 1
        if self.calls in self.interrupt_at:
            self.interrupt_at.discard(self.calls)
            raise KeyboardInterrupt
        x, y = batch
        loss = F.mse_loss(model(x), y)
        if model.training:
            self.train_calls += 1
            if self.train_calls in self.nan_at:
                self.nan_at.discard(self.train_calls)
                loss = loss * float("nan")
        return loss


def _data() -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N_SAMPLES, 4, generator=gen, dtype=torch.float64)
    y = (x.sum(1, keepdim=True) > 0).double() + 0.1 * torch.randn(
        N_SAMPLES, 1, generator=gen, dtype=torch.float64
    )
    val = [(x[:8] + 0.3, y[:8]), (x[8:12] - 0.2, y[8:12])]
    return x, y, val


X, Y, VAL = _data()


def reshuffled(epoch: int) -> list[Any]:
    """A new order every epoch, drawn from torch's global generator."""
    order = torch.randperm(N_SAMPLES)
    return [(X[order[i : i + BATCH]], Y[order[i : i + BATCH]]) for i in range(0, N_SAMPLES, BATCH)]


def fit_run(
    loss: Loss, directory: Any = None, ckpt: dict[str, Any] | None = None, **kwargs: Any
) -> ll.FitResult:
    """One call of ``fit`` as a training script makes it: seed torch, build, fit."""
    torch.manual_seed(0)
    model = mlp(dropout=0.3, batchnorm=True)  # dropout draws from the global generator
    opt = ll.optim.adam(0.05)
    step = ll.chain(ll.accumulate(2), ll.track_norm(), ll.clip(1.0))(
        ll.train_step(model, loss, opt)
    )
    options: dict[str, Any] = {
        "val": VAL,
        "max_epochs": 12,
        "stop": ll.early_stopping("val_loss", patience=2),
        "progress": False,
    }
    if directory is not None:
        options["checkpoints"] = ll.Checkpoints(directory, **(ckpt or {}))
    return ll.fit(step, ll.init(model, opt), reshuffled, **(options | kwargs))


def ckpt(tag: int) -> str:
    return f"ckpt-{tag:08d}.looplib.safetensors"


def without_time(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: x for k, x in entry.items() if k != "time"} for entry in history]


def assert_same_run(a: ll.FitResult, b: ll.FitResult) -> None:
    assert_trees_equal(a.state, b.state)
    assert without_time(a.history) == without_time(b.history)
    assert a.stop_reason == b.stop_reason


_REFERENCE: dict[str, Any] = {}


def reference() -> tuple[ll.FitResult, int]:
    """The uninterrupted run without checkpoints, and how many times it calls the loss."""
    if not _REFERENCE:
        loss = Loss()
        _REFERENCE["result"] = fit_run(loss)
        _REFERENCE["calls"] = loss.calls
    return _REFERENCE["result"], _REFERENCE["calls"]


def test_the_reference_run_stops_early_mid_range() -> None:
    result, _ = reference()
    assert 3 <= len(result.history) < 12
    assert all(entry["batches"] == 5 for entry in result.history)
    assert result.stop_reason.startswith("early_stopping(monitor='val_loss')")


@settings(max_examples=8)
@given(
    interrupts=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=2),
    every_batches=st.integers(1, 4),
    every=st.integers(1, 2),
    keep_last=st.integers(1, 3),
)
def test_interrupted_fit_resumes_to_the_same_state_and_history(
    tmp_path_factory: pytest.TempPathFactory,
    interrupts: list[float],
    every_batches: int,
    every: int,
    keep_last: int,
) -> None:
    expected, calls = reference()
    directory = tmp_path_factory.mktemp("ckpt")
    ckpt = {"every_batches": every_batches, "every_epochs": every, "keep_last": keep_last}
    # Each interrupt is at a call of the loss counted from the start of the call of fit that
    # it interrupts; the run is restarted by calling fit again with the same directory. With
    # two, each falls in the first half, so that the resumed run still reaches the second.
    span = calls if len(interrupts) == 1 else calls // 2
    for fraction in interrupts:
        loss = Loss(interrupt_at=(1 + int(fraction * span),))
        with pytest.raises(KeyboardInterrupt):
            fit_run(loss, directory, ckpt)
    assert_same_run(fit_run(Loss(), directory, ckpt), expected)


def test_checkpointing_does_not_change_the_run(tmp_path: Path) -> None:
    expected, _ = reference()
    assert_same_run(fit_run(Loss(), tmp_path, {"every_batches": 1}), expected)


def test_a_finished_run_stays_finished(tmp_path: Path) -> None:
    expected, _ = reference()
    assert_same_run(fit_run(Loss(), tmp_path), expected)
    again = Loss()
    assert_same_run(fit_run(again, tmp_path, max_epochs=50), expected)
    assert again.calls == 0


def test_a_run_ended_by_max_epochs_extends_as_if_never_stopped(tmp_path: Path) -> None:
    expected, _ = reference()
    first = fit_run(Loss(), tmp_path, max_epochs=2)
    assert len(first.history) == 2 and first.stop_reason == "max_epochs=2 reached"
    assert_same_run(fit_run(Loss(), tmp_path), expected)


def test_resume_false_starts_over(tmp_path: Path) -> None:
    expected, _ = reference()
    fit_run(Loss(), tmp_path, max_epochs=2)
    assert_same_run(fit_run(Loss(), tmp_path, resume=False), expected)


BEST = {"every_batches": 2, "keep_last": 2, "keep_best": 1, "monitor": "val_loss", "mode": "min"}


def test_rotation_keeps_the_latest_and_the_best(tmp_path: Path) -> None:
    ends: list[tuple[ll.TrainState, dict[str, float]]] = []
    result = fit_run(
        Loss(),
        tmp_path,
        BEST,
        on_epoch_end=lambda state, entry: ends.append((state, dict(entry))),
        monitor="val_loss",
        mode="min",
    )
    assert_same_run(result, reference()[0])
    # Every 2 batches (5 an epoch) and at every epoch end, tagged by batches run in all.
    done = 5 * len(result.history)
    tags = sorted({t for t in range(2, done + 1, 2)} | {5 * (e + 1) for e in range(len(ends))})
    best_epoch = min(range(len(ends)), key=lambda e: ends[e][1]["val_loss"])
    kept = sorted(set(tags[-2:]) | {5 * (best_epoch + 1)})
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == [ckpt(t) for t in kept]
    assert ll.latest_checkpoint(tmp_path) == tmp_path / ckpt(done)
    assert_trees_equal(ll.load(ll.latest_checkpoint(tmp_path))["state"], result.state)
    # Any safetensors reader gets the parameters under readable names.
    tensors = load_file(ll.latest_checkpoint(tmp_path))
    for name, param in result.state.params.items():
        assert torch.equal(tensors[f"state.params.{name}"], param)
    best = ll.best_checkpoint(tmp_path)
    assert best == tmp_path / ckpt(5 * (best_epoch + 1))
    assert_trees_equal(ll.load(best)["state"], ends[best_epoch][0])
    # result.best is that state, also after resuming a finished run.
    assert result.best is not None
    assert_trees_equal(result.best, ends[best_epoch][0])
    again = fit_run(Loss(), tmp_path, BEST, monitor="val_loss", mode="min")
    assert again.best is not None
    assert_trees_equal(again.best, ends[best_epoch][0])
    # Nothing else is left behind; the history is one JSON line per epoch.
    assert {p.name for p in tmp_path.iterdir()} == {
        *(ckpt(t) for t in kept),
        "index.json",
        ".looplib.lock",
        "history.jsonl",
    }
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == result.history


def test_every_checkpoint_carries_the_same_small_metadata(tmp_path: Path) -> None:
    """The history lives in history.jsonl; a checkpoint does not grow with the run."""
    fit_run(Loss(), tmp_path, {"every_batches": 1, "keep_last": 100})
    # Two sizes: mid-epoch checkpoints also hold the generator states of the epoch's start.
    sizes = {p.stat().st_size for p in tmp_path.glob("ckpt-*")}
    assert len(sizes) == 2, sizes
    _, extra = ll.load_with_extra(ll.latest_checkpoint(tmp_path))
    assert "history" not in extra and extra["epochs"] == len(reference()[0].history)


@settings(max_examples=6)
@given(bad=st.integers(1, 25), every_batches=st.sampled_from([None, 1, 3]))
def test_a_nan_loss_never_reaches_a_checkpoint_and_resumes_exactly(
    tmp_path_factory: pytest.TempPathFactory, bad: int, every_batches: int | None
) -> None:
    expected, _ = reference()
    directory = tmp_path_factory.mktemp("nan")
    options = {"every_batches": every_batches, "keep_last": 100}
    with pytest.raises(ll.NonFiniteLossError) as info:
        fit_run(Loss(nan_at=(bad,)), directory, options)
    err = info.value
    assert err.epoch == (bad - 1) // 5
    assert finite(err.state)
    # The state is frozen at the last good update: the window (of 2) before the bad batch.
    assert int(err.state.step) == len(err.history) * 3 + ((bad - 1) % 5) // 2
    for path in directory.glob("ckpt-*"):
        saved = ll.load(path)["state"]
        assert finite(saved) and int(saved.step) <= int(err.state.step)
    # Once the cause is gone (here the NaN was a one-off), the run resumes from the latest
    # checkpoint with the same data order and random draws, as if the bad batch never failed.
    assert_same_run(fit_run(Loss(), directory, options), expected)


def finite(state: ll.TrainState) -> bool:
    leaves = [*state.params.values(), *optree.tree_leaves(state.opt_state)]
    return all(bool(torch.isfinite(x).all()) for x in leaves if x.is_floating_point())


def test_a_nan_loss_resumes_into_the_same_error(tmp_path: Path) -> None:
    class NanOnShortBatches(Loss):
        """NaN on every batch of 2 samples (the last of each epoch): a fault in the data."""

        def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
            loss = super().__call__(model, batch)
            return loss * float("nan") if model.training and len(batch[0]) == 2 else loss

    errors = []
    for _ in range(2):
        with pytest.raises(ll.NonFiniteLossError) as info:
            fit_run(NanOnShortBatches(), tmp_path, {"every_batches": 1})
        errors.append(info.value)
    assert [(e.epoch, e.step) for e in errors] == [(0, 2), (0, 2)]
    assert_trees_equal(errors[0].state, errors[1].state)


def test_a_corrupted_latest_checkpoint_is_reported_not_skipped(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        fit_run(Loss(interrupt_at=(17,)), tmp_path, {"every_batches": 2})
    latest = ll.latest_checkpoint(tmp_path)
    assert latest is not None
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0x01
    latest.write_bytes(bytes(data))
    loss = Loss()
    with pytest.raises(ValueError) as info:
        fit_run(loss, tmp_path, {"every_batches": 2})
    # The loader's own message names the file and the damage; a note says where it arose.
    assert latest.name in str(info.value)
    assert "must be an intact looplib checkpoint" in str(info.value)
    notes = getattr(info.value, "__notes__", [])
    assert any(n.startswith(f"fit: while resuming from {latest}") for n in notes), notes
    assert loss.calls == 0  # nothing ran: no silent restart from scratch


# ------------------------------------------------------------------ another run's checkpoints
def _linear_run(width: int, opt: ll.Optimizer, directory: Path, **kwargs: Any) -> ll.FitResult:
    model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1)).double()
    step = ll.train_step(model, mse_loss, opt)
    data = [(X[i : i + BATCH], Y[i : i + BATCH]) for i in range(0, N_SAMPLES, BATCH)]
    return ll.fit(
        step, ll.init(model, opt), data, max_epochs=2, progress=False,
        checkpoints=ll.Checkpoints(directory), **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("width", "opt", "message"),
    [
        (
            32,
            ll.optim.adam(0.01),
            "state.params['0.weight'] is Tensor(shape=(16, 4), dtype=torch.float64) in the "
            "checkpoint and Tensor(shape=(32, 4), dtype=torch.float64) in the state passed in",
        ),
        (16, ll.optim.sgd(0.01), "state.opt_state"),
    ],
)
def test_another_runs_checkpoint_is_refused_by_name(
    tmp_path: Path, width: int, opt: ll.Optimizer, message: str
) -> None:
    _linear_run(16, ll.optim.adam(0.01), tmp_path)
    with pytest.raises(ValueError) as info:
        _linear_run(width, opt, tmp_path)
    text = str(info.value)
    assert text.startswith(f"fit(checkpoints={str(tmp_path)!r}): the latest checkpoint there")
    assert message in text and "Use another directory, or pass resume=False" in text
    result = _linear_run(width, opt, tmp_path, resume=False)  # the way out
    assert result.state.params["0.weight"].shape == (width, 4)


# ------------------------------------------------------------------------ failures around saves
def test_a_checkpoint_path_that_is_a_file_fails_before_training(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    loss = Loss()
    with pytest.raises(NotADirectoryError, match=r"^fit\(checkpoints='.*file'\): checkpoints must"):
        fit_run(loss, target)
    assert loss.calls == 0


def test_an_unwritable_directory_fails_before_training(tmp_path: Path) -> None:
    (tmp_path / f".looplib-probe-{os.getpid()}").mkdir()  # the probe write fails
    loss = Loss()
    with pytest.raises(PermissionError, match="checkpoints must be a writable directory"):
        fit_run(loss, tmp_path)
    assert loss.calls == 0


def test_a_failed_save_mid_run_keeps_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import errno

    import looplib._resume as resume

    real, calls = resume.save_rotating, {"n": 0}

    def full_disk(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(resume, "save_rotating", full_disk)
    with pytest.raises(ll.CheckpointError) as info:
        fit_run(Loss(), tmp_path, {"every_batches": 2})
    err = info.value
    assert str(tmp_path) in str(err) and "No space left on device" in str(err)
    assert isinstance(err, OSError) and err.directory == tmp_path
    assert int(err.state.step) > 0 and finite(err.state)
    monkeypatch.setattr(resume, "save_rotating", real)
    assert_same_run(fit_run(Loss(), tmp_path, {"every_batches": 2}), reference()[0])


# ------------------------------------------------------------------------------ the crash storm
_STORM = (
    "import sys; sys.path.insert(0, sys.argv[1]); import tests.test_resume as t; "
    "t.storm_child(sys.argv[2], sys.argv[3])"
)


def storm_child(directory: str, out: str) -> None:
    """A training script checkpointing at every batch; says when it is ready to be killed."""
    print("ready", flush=True)
    result = fit_run(Loss(), directory, {"every_batches": 1, "keep_last": 2})
    ll.save(
        {"state": result.state},
        out,
        extra={"history": result.history, "reason": result.stop_reason},
    )


def test_a_storm_of_sigkills_resumes_bit_exactly_and_leaves_nothing_behind(tmp_path: Path) -> None:
    import random
    import signal
    import time

    from looplib._resume import Checkpointer

    expected, _ = reference()
    directory, out = tmp_path / "run", tmp_path / "result.ll"
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    kills, deadline = 0, time.monotonic() + 22
    while True:
        child = subprocess.Popen(
            [sys.executable, "-c", _STORM, str(ROOT), str(directory), str(out)],
            stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        if time.monotonic() < deadline:
            time.sleep(rng.uniform(0.0, 0.4))
        if child.poll() is None and time.monotonic() < deadline:
            child.send_signal(signal.SIGKILL)
            kills += 1
        code = child.wait(timeout=120)
        child.stdout.close()
        if code == 0:
            break
        assert code == -signal.SIGKILL
        # The next run's start clears what the killed one left: temporaries, unlisted files.
        starting = Checkpointer(ll.Checkpoints(directory))
        starting.open()
        listed = {p.name for p in directory.glob("ckpt-*")}
        index = json.loads((directory / "index.json").read_text()) if listed else None
        starting.close()
        if index is not None:
            assert listed == {row["file"] for row in index["checkpoints"]}
        assert {p.name for p in directory.iterdir()} <= {
            *listed,
            "index.json",
            ".looplib.lock",
            "history.jsonl",
        }
    assert kills >= 2
    tree, extra = ll.load_with_extra(out)
    assert_trees_equal(tree["state"], expected.state)
    assert without_time(extra["history"]) == without_time(expected.history)
    assert extra["reason"] == expected.stop_reason
