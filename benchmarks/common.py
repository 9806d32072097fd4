"""The benchmark harness: workloads, contestants, an equivalence check, interleaved timing,
peak memory in fresh subprocesses, and a markdown report.

Every contestant starts from the same initial weights and consumes the same pre-built batches
(already on the device). The harness first runs each one for a few units from scratch and
compares its parameters with the hand-written loop's; then it times them interleaved in one
process, ``for r in range(repeats): for c in contestants (rotated by r): c.run(burn + steps)``,
and reports per-unit times and, for every repeat, the ratio to the hand-written loop measured in
that same repeat. A "unit" is what one row of the table is timed per: one optimizer step (W1, W2,
W3 = 4 micro-batches), one batch of 4 TBPTT chunks (W4) or one update of an ensemble of 8 (W5).
The looplib contestants run ``Step.run(state, unit_batches, start=0)`` per unit (no host read;
see ``build_looplib``).

Run the entry points (``bench_speed.py``, ``bench_memory.py``) rather than this module; it is
also the child process of the memory measurement (``common.py --memory-child ...``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import itertools
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import looplib as ll  # noqa: E402

LR = 1e-3
CONTESTANTS = (
    "hand",
    "lightning",
    "looplib_loop",
    "looplib",
    "looplib_donated",
    "looplib_compiled",
    "looplib_cudagraphs",
    "looplib_fold",
)
"""Every contestant, in table order (see README.md). ``looplib_loop`` runs on ensembles (W5)
only, ``lightning`` on single models only; ``looplib_cudagraphs`` needs CUDA; ``looplib_fold``
(one ``ll.fold`` over the timed units) is a memory contestant, timed only when asked for."""
SPEED_DEFAULT = tuple(n for n in CONTESTANTS if n != "looplib_fold")
MEMORY_DEFAULT = CONTESTANTS
COMPILING = ("looplib_compiled", "looplib_cudagraphs")
"""Contestants that compile (tens of seconds per workload on a small CPU): ``--quick`` leaves
them out unless asked for by name."""
CHECK_UNITS = 2
"""Units run before the parameters are compared. Adam turns one-ulp differences (a different but
equally exact rounding of the update) into differences of up to ``lr`` within a few steps on
gradients that nearly cancel, so the comparison is made early."""
CHECK_ATOL = 1e-5
CHECK_RTOL = 1e-4

# ------------------------------------------------------------------------------- workloads


class LSTMNet(nn.Module):
    """LSTM(16 -> 128, batch_first) and a Linear(128 -> 10) head on every time step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 128, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor, carry: Any = None) -> tuple[torch.Tensor, Any]:
        out, carry = self.lstm(x, carry)
        return self.head(out), carry


def mlp(*sizes: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mlp_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def lstm_loss(model: nn.Module, batch: Any, carry: Any) -> tuple[torch.Tensor, None, Any]:
    x, y = batch
    logits, carry = model(x, carry)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), None, carry


@dataclass(frozen=True)
class Workload:
    """One training job, identical for every contestant.

    ``micro`` micro-batches make one timed unit (accumulation); ``chunk`` is the TBPTT chunk
    length (one optimizer step per chunk); ``clip`` the max gradient norm (with the total norm
    tracked as a tensor); ``members`` the size of an ensemble (0: a single model), each member
    with its own initial weights and its own slice of the batch. ``capturable=False`` marks a
    model ``torch.compile`` cannot capture whole (nn.LSTM): the compiled contestants run it
    with ``fallback="eager"`` and say so in their note.
    """

    key: str
    title: str
    unit: str
    make_model: Callable[[], nn.Module]
    batch: int
    features: int
    steps: int
    burn: int
    micro: int = 1
    chunk: int | None = None
    seq_len: int = 0
    clip: float | None = None
    members: int = 0
    capturable: bool = True

    def make_unit(self, gen: torch.Generator) -> Any:
        """One unit's data (on the CPU): a batch, a list of micro-batches, a sequence batch, or
        (an ensemble) one batch per member stacked on a leading axis."""
        if self.members:
            return (
                torch.randn(self.members, self.batch, self.features, generator=gen),
                torch.randint(0, 10, (self.members, self.batch), generator=gen),
            )
        if self.chunk is not None:
            x = torch.randn(self.batch, self.seq_len, self.features, generator=gen)
            y = torch.randint(0, 10, (self.batch, self.seq_len), generator=gen)
            return (x, y)
        mbs = [
            (
                torch.randn(self.batch, self.features, generator=gen),
                torch.randint(0, 10, (self.batch,), generator=gen),
            )
            for _ in range(self.micro)
        ]
        return mbs if self.micro > 1 else mbs[0]


WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in (
        Workload(
            "W1",
            "tiny MLP 32-64-64-10, batch 32, Adam",
            "optimizer step",
            lambda: mlp(32, 64, 64, 10),
            batch=32,
            features=32,
            steps=200,
            burn=20,
        ),
        Workload(
            "W2",
            "MLP 784-1024-1024-10, batch 256, Adam",
            "optimizer step",
            lambda: mlp(784, 1024, 1024, 10),
            batch=256,
            features=784,
            steps=20,
            burn=3,
        ),
        Workload(
            "W3",
            "W1 + accumulate 4 x 32, track grad 2-norm, clip 1.0",
            "optimizer step (4 micro-batches)",
            lambda: mlp(32, 64, 64, 10),
            batch=32,
            features=32,
            steps=200,
            burn=20,
            micro=4,
            clip=1.0,
        ),
        Workload(
            "W4",
            "LSTM 16-128 + Linear, seq 64, TBPTT 16, batch 32, Adam",
            "batch (4 chunks = 4 optimizer steps)",
            LSTMNet,
            batch=32,
            features=16,
            steps=30,
            burn=5,
            chunk=16,
            seq_len=64,
            capturable=False,
        ),
        Workload(
            "W5",
            "ensemble of 8 x W1 (own weights, own batch each), Adam",
            "update of all 8 members (8 optimizer steps)",
            lambda: mlp(32, 64, 64, 10),
            batch=32,
            features=32,
            steps=100,
            burn=10,
            members=8,
        ),
    )
}

CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # CPU time of this process: immune to being preempted by other processes on a shared
    # machine; it equals the work done only with one thread and on the CPU (not for CUDA).
    "cpu": time.process_time,
}
clock: Callable[[], float] = time.perf_counter


def set_clock(name: str) -> None:
    global clock
    clock = CLOCKS[name]


QUICK_STEPS = {"W1": 20, "W2": 3, "W3": 20, "W4": 3, "W5": 5}


def parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {bad or text!r}; choose from {', '.join(allowed)}")
    return items


# ------------------------------------------------------------------------------- devices


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, list):
        return [to_device(x, device) for x in tree]
    if isinstance(tree, tuple):
        return tuple(to_device(x, device) for x in tree)
    return tree


@dataclass
class Problem:
    """A workload made concrete: initial weights (one set per ensemble member, else one) and a
    pool of batches, on the device."""

    workload: Workload
    device: torch.device
    init_weights: list[dict[str, torch.Tensor]]
    pool: list[Any]

    def fresh_model(self, member: int = 0) -> nn.Module:
        model = self.workload.make_model().to(self.device)
        model.load_state_dict(copy.deepcopy(self.init_weights[member]))
        return model

    def units(self, n: int, offset: int = 0) -> list[Any]:
        return [self.pool[(offset + i) % len(self.pool)] for i in range(n)]


def make_problem(w: Workload, device: torch.device, pool_size: int, seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    init = [
        {k: v.detach().clone().to(device) for k, v in w.make_model().state_dict().items()}
        for _ in range(max(w.members, 1))
    ]
    gen = torch.Generator().manual_seed(seed + 1)
    pool = [to_device(w.make_unit(gen), device) for _ in range(pool_size)]
    return Problem(w, device, init, pool)


def unit_batches(w: Workload, unit: Any) -> list[Any]:
    """The batches of one unit, as ``Step.run`` takes them: the micro-batches of one update
    (W3), else ``[unit]`` (one batch; W4's is split into chunks by the step, W5's is one batch
    per member stacked on axis 0)."""
    return unit if w.micro > 1 else [unit]


# ------------------------------------------------------------------------------- contestants


@dataclass
class Timing:
    first_s: float  # from the start of the call to the end of its first unit
    timed_s: float  # the units after the burn-in, synchronized at both ends


class Skip(Exception):
    """A contestant that cannot run here (a missing package or API)."""


class Eager:
    """A contestant driven one unit at a time from Python: ``hand`` and every looplib variant
    but ``looplib_fold``. ``do_unit`` must not read a device value on the host (on CUDA that
    would be a sync per unit; the harness counts them, see :func:`host_syncs`)."""

    def __init__(
        self,
        problem: Problem,
        do_unit: Callable[[Any], None],
        params: Callable[[], Any],
        note: Callable[[], str] = lambda: "",
    ):
        self.problem = problem
        self.do_unit = do_unit
        self.params = params
        self.note = note

    def run(self, units: list[Any], burn: int) -> Timing:
        dev = self.problem.device
        sync(dev)
        start = clock()
        self.do_unit(units[0])
        sync(dev)
        first = clock()
        for unit in units[1:burn]:
            self.do_unit(unit)
        sync(dev)
        t0 = clock()
        for unit in units[burn:]:
            self.do_unit(unit)
        sync(dev)
        t1 = clock()
        return Timing(first - start, t1 - t0)


def build_hand(p: Problem) -> Eager:
    w = p.workload
    if w.members:
        return build_hand_ensemble(p)
    model = p.fresh_model()
    opt = torch.optim.Adam(model.parameters(), lr=LR, foreach=True)
    params = list(model.parameters())
    norms: list[torch.Tensor] = []

    if w.chunk is not None:
        chunk = w.chunk

        def do_unit(unit: Any) -> None:
            x, y = unit
            carry = None
            for t in range(0, x.shape[1], chunk):
                loss, _, carry = lstm_loss(model, (x[:, t : t + chunk], y[:, t : t + chunk]), carry)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                carry = tuple(h.detach() for h in carry)

    elif w.micro > 1:
        scale = 1.0 / w.micro
        max_norm = w.clip if w.clip is not None else float("inf")

        def do_unit(unit: Any) -> None:
            for mb in unit:
                (mlp_loss(model, mb) * scale).backward()
            # The total (pre-clip) norm, kept as a tensor: no host sync.
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norms[:] = [norm]
            opt.step()
            opt.zero_grad(set_to_none=True)

    else:

        def do_unit(unit: Any) -> None:
            mlp_loss(model, unit).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return Eager(p, do_unit, lambda: dict(model.named_parameters()))


def build_hand_ensemble(p: Problem) -> Eager:
    """W5's reference: one hand-written loop per member, run one after the other per unit."""
    n = p.workload.members
    models = [p.fresh_model(i) for i in range(n)]
    opts = [torch.optim.Adam(m.parameters(), lr=LR, foreach=True) for m in models]

    def do_unit(unit: Any) -> None:
        x, y = unit
        for i in range(n):
            mlp_loss(models[i], (x[i], y[i])).backward()
            opts[i].step()
            opts[i].zero_grad(set_to_none=True)

    def params() -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v for i, m in enumerate(models) for k, v in m.named_parameters()}

    return Eager(p, do_unit, params)


def looplib_step(p: Problem, model: nn.Module, opt: ll.Optimizer) -> ll.Step:
    """The eager looplib step of a workload (for W5: one member's; see :func:`build_looplib`)."""
    w = p.workload
    if w.chunk is not None:
        return ll.chain(ll.tbptt_split(w.chunk))(ll.train_step(model, lstm_loss, opt))
    base = ll.train_step(model, mlp_loss, opt)
    if w.micro > 1:
        stages = [ll.accumulate(w.micro)]
        if w.clip is not None:
            stages += [ll.track_norm(2, per_param=False), ll.clip(w.clip)]
        return ll.chain(*stages)(base)
    return base


def first_batch(w: Workload, unit: Any) -> Any:
    """The example batch ``Step.init`` completes the state with (one micro-batch of W3)."""
    return unit_batches(w, unit)[0]


def looplib_state(p: Problem, step: ll.Step, opt: ll.Optimizer) -> Any:
    """The contestant's own complete state: ``ll.init`` (copies of the initial weights; for W5
    one state per member, ``ll.stack``-ed), then ``step.init`` once with the first batch, so
    that no timed unit completes it."""
    w = p.workload
    if w.members:
        state = ll.stack([ll.init(p.fresh_model(i), opt, seed=i) for i in range(w.members)])
    else:
        state = ll.init(p.fresh_model(), opt, seed=0)
    return step.init(state, first_batch(w, p.pool[0]))


def looplib_params(w: Workload, state: Any) -> dict[str, torch.Tensor]:
    if not w.members:
        return state.params
    return {f"{i}.{k}": v for i, s in enumerate(ll.unstack(state)) for k, v in s.params.items()}


VARIANTS = {
    # name: (donate, compile mode or None for eager)
    "looplib": (False, None),
    "looplib_donated": (True, None),
    "looplib_compiled": (True, "default"),
    "looplib_cudagraphs": (True, "reduce-overhead"),
}


def build_looplib(p: Problem, name: str = "looplib") -> Eager:
    """A looplib contestant: ``state = step.run(state, unit_batches, 0, donate)`` per unit.

    Why ``Step.run`` with ``start=0`` and not ``ll.fold`` or ``step(state, batch)`` per unit:
    every unit is one whole accumulation window (W3) or a window of one, so the window position
    at its start is known to be 0, and ``run`` decides which micro-batch closes the window in
    Python, with no host read. ``fold`` reads the position from the state once per call (a sync
    on a GPU, once per unit if called per unit) and copies the state it is given before donating
    the copies; ``step(state, batch)`` runs one micro-batch per call and checks the state's
    structure each time. The state is completed once, before timing (:func:`looplib_state`).

    Variants (``VARIANTS``): ``looplib`` the pure eager step; ``looplib_donated`` the same with
    ``donate=True`` on the contestant's own state (what ``fold``/``fit`` do with the states they
    make); ``looplib_compiled`` ``ll.compile(step).run(..., donate=True)``; ``looplib_cudagraphs``
    ``ll.compile(step, mode="reduce-overhead", donate=True)`` (CUDA only). W5 runs
    ``ll.vmap(step, batch_axis=0)`` on a stacked state. A workload the compiler cannot capture
    (W4's LSTM) compiles with ``fallback="eager"``, and the row's note says it fell back.
    """
    w = p.workload
    donate, mode = VARIANTS[name]
    if mode is not None and not hasattr(ll, "compile"):
        raise Skip("looplib has no compile() in this version")
    if mode == "reduce-overhead" and p.device.type != "cuda":
        raise Skip("CUDA graphs need a CUDA device")
    opt = ll.optim.adam(lr=LR)
    step = looplib_step(p, p.fresh_model(), opt)
    if w.members:
        step = ll.vmap(step, batch_axis=0)
    state = looplib_state(p, step, opt)
    runner: Any = step
    if mode is not None:
        fallback = "raise" if w.capturable else "eager"
        if mode == "default":
            runner = ll.compile(step, fallback=fallback)
        else:
            runner = ll.compile(step, mode=mode, donate=True, fallback=fallback)
    box = [state]
    del state

    if w.micro > 1:

        def do_unit(unit: Any) -> None:
            box[0] = runner.run(box[0], unit, 0, donate)

    else:

        def do_unit(unit: Any) -> None:
            box[0] = runner.run(box[0], [unit], 0, donate)

    def note() -> str:
        if mode is not None and getattr(runner, "eager", False):
            return f"compile fell back to eager (fallback='eager'): {runner.error}"[:200]
        return ""

    return Eager(p, do_unit, lambda: looplib_params(w, box[0]), note)


def build_looplib_loop(p: Problem) -> Eager:
    """W5 without ``vmap``: one eager looplib step (one step object, one state per member), run
    on each member's slice of the unit in turn: ``states[i] = step.run(states[i], [(x[i],
    y[i])], 0)``."""
    w = p.workload
    if not w.members:
        raise Skip("an ensemble workload (W5) only")
    opt = ll.optim.adam(lr=LR)
    step = looplib_step(p, p.fresh_model(), opt)
    x0, y0 = p.pool[0]
    states = [
        step.init(ll.init(p.fresh_model(i), opt, seed=i), (x0[i], y0[i])) for i in range(w.members)
    ]

    def do_unit(unit: Any) -> None:
        x, y = unit
        for i in range(w.members):
            states[i] = step.run(states[i], [(x[i], y[i])], 0)

    def params() -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v for i, s in enumerate(states) for k, v in s.params.items()}

    return Eager(p, do_unit, params)


class Folded:
    """``looplib_fold``: ``state = ll.fold(step, state, batches)`` over a whole range of units
    (the first unit, the burn-in, the timed units: three calls), on the eager pure step. ``fold``
    completes the state, reads the window position once per call, copies the state it is
    given and donates the states it makes, as ``ll.fit`` does."""

    def __init__(self, p: Problem) -> None:
        w = p.workload
        self.problem = p
        opt = ll.optim.adam(lr=LR)
        step = looplib_step(p, p.fresh_model(), opt)
        self.step = ll.vmap(step, batch_axis=0) if w.members else step
        if w.members:
            members = [ll.init(p.fresh_model(i), opt, seed=i) for i in range(w.members)]
            self.state = ll.stack(members)
        else:
            self.state = ll.init(p.fresh_model(), opt, seed=0)

    def params(self) -> dict[str, torch.Tensor]:
        return looplib_params(self.problem.workload, self.state)

    def _fold(self, units: list[Any]) -> None:
        w = self.problem.workload
        if units:
            batches = [b for u in units for b in unit_batches(w, u)]
            self.state = ll.fold(self.step, self.state, batches)

    def run(self, units: list[Any], burn: int) -> Timing:
        dev = self.problem.device
        sync(dev)
        start = clock()
        self._fold(units[:1])
        sync(dev)
        first = clock()
        self._fold(units[1:burn])
        sync(dev)
        t0 = clock()
        self._fold(units[burn:])
        sync(dev)
        t1 = clock()
        return Timing(first - start, t1 - t0)


def applicable(name: str, w: Workload) -> bool:
    """Whether a contestant has a row for this workload at all (otherwise it is left out)."""
    if name == "looplib_loop":
        return bool(w.members)
    if name == "lightning":
        return not w.members
    return True


# -- Lightning


def import_lightning() -> Any:
    """The Lightning package (``pytorch_lightning`` or ``lightning.pytorch``), quietened."""
    try:
        import pytorch_lightning as pl
    except ImportError:
        try:
            import lightning.pytorch as pl  # type: ignore[no-redef]
        except ImportError as e:
            raise Skip(
                "PyTorch Lightning is not installed (pip install -c constraints-cpu.txt "
                '"pytorch-lightning>=2.2")'
            ) from e
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return pl


def _identity(x: Any) -> Any:
    return x


class LightningRunner:
    """Runs a workload through ``Trainer.fit``; one fit per :meth:`run` call.

    Timing method: a callback synchronizes and reads the clock in ``on_train_batch_end``. The
    timed range runs from the end of the last burn-in unit to the end of the last unit, so it
    holds exactly ``steps`` complete iterations of Lightning's loop (fetching the batch from
    the DataLoader, moving it to the device, the hooks, the step), and nothing of the Trainer's
    construction or of ``fit``'s setup and teardown. The first-unit time runs from the call of
    ``trainer.fit`` to the end of the first unit, so it includes ``fit``'s setup. The optimizer
    lives on the module, so its state carries over from one fit to the next.
    """

    def __init__(self, p: Problem) -> None:
        pl = import_lightning()
        self.pl = pl
        self.problem = p
        w = p.workload
        net = p.fresh_model()
        self.net = net
        self.module = self._module(pl, w, net)

    @staticmethod
    def _module(pl: Any, w: Workload, net: nn.Module) -> Any:
        class Lit(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = net
                self.opt = torch.optim.Adam(net.parameters(), lr=LR, foreach=True)
                self.automatic_optimization = w.chunk is None

            def configure_optimizers(self) -> Any:
                return self.opt

            def training_step(self, batch: Any, batch_idx: int) -> Any:
                if self.automatic_optimization:
                    return mlp_loss(self.net, batch)
                # Lightning's recipe for truncated BPTT (manual optimization).
                opt = self.optimizers()
                x, y = batch
                carry = None
                for t in range(0, x.shape[1], w.chunk):
                    chunk = (x[:, t : t + w.chunk], y[:, t : t + w.chunk])
                    loss, _, carry = lstm_loss(self.net, chunk, carry)
                    opt.zero_grad()
                    self.manual_backward(loss)
                    opt.step()
                    carry = tuple(h.detach() for h in carry)
                return None

        if w.clip is None:
            return Lit()

        class LitTracked(Lit):
            def on_before_optimizer_step(self, optimizer: Any) -> None:
                # Called before Lightning clips: the total norm of the accumulated gradient.
                grads = [q.grad for q in self.net.parameters() if q.grad is not None]
                self.grad_norm = torch.nn.utils.get_total_norm(grads, 2.0)

        return LitTracked()

    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.net.named_parameters())

    def run(self, units: list[Any], burn: int) -> Timing:
        pl, p, w = self.pl, self.problem, self.problem.workload
        if burn < 1:
            raise ValueError("LightningRunner.run needs burn >= 1 (the timed range starts there)")
        m = w.micro
        batches = [mb for u in units for mb in u] if m > 1 else list(units)
        marks = [(m - 1, "first"), (burn * m - 1, "t0"), (len(batches) - 1, "t1")]
        ends = {idx for idx, _ in marks}
        stamps: dict[str, float] = {}
        dev = p.device

        class Clock(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
                if batch_idx in ends:
                    sync(dev)
                    now = clock()
                    for idx, tag in marks:
                        if idx == batch_idx:
                            stamps[tag] = now

        extra: dict[str, Any] = {}
        if m > 1:
            extra["accumulate_grad_batches"] = m
        if w.clip is not None:
            extra["gradient_clip_val"] = w.clip
            extra["gradient_clip_algorithm"] = "norm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = pl.Trainer(
                accelerator="gpu" if dev.type == "cuda" else "cpu",
                devices=[dev.index or 0] if dev.type == "cuda" else 1,
                max_epochs=1,
                max_steps=-1,
                enable_checkpointing=False,
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                use_distributed_sampler=False,
                callbacks=[Clock()],
                **extra,
            )
            loader = torch.utils.data.DataLoader(
                batches, batch_size=None, shuffle=False, collate_fn=_identity
            )
            sync(dev)
            start = clock()
            trainer.fit(self.module, train_dataloaders=loader)
        return Timing(stamps["first"] - start, stamps["t1"] - stamps["t0"])


def build(name: str, p: Problem) -> Any:
    """A fresh contestant; raises :class:`Skip` when it cannot run here."""
    if name == "hand":
        return build_hand(p)
    if name in VARIANTS:
        return build_looplib(p, name)
    if name == "looplib_loop":
        return build_looplib_loop(p)
    if name == "looplib_fold":
        return Folded(p)
    if name == "lightning":
        if p.workload.members:
            raise Skip("no ensemble recipe for Lightning")
        return LightningRunner(p)
    raise ValueError(name)


# ------------------------------------------------------------------------------- the check


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, bool]:
    """Max |a - b| over all parameters (matched by name) and whether all are allclose."""
    if a.keys() != b.keys():
        raise ValueError(f"parameter names differ: {sorted(a)} vs {sorted(b)}")
    worst, close = 0.0, True
    for k in a:
        x, y = a[k].detach().float().cpu(), b[k].detach().float().cpu()
        worst = max(worst, (x - y).abs().max().item())
        close = close and torch.allclose(x, y, rtol=CHECK_RTOL, atol=CHECK_ATOL)
    return worst, close


# ------------------------------------------------------------------------------- results


@dataclass
class Row:
    workload: str
    contestant: str
    unit_s: list[float] = field(default_factory=list)  # per repeat: seconds per unit
    ratios: list[float] = field(default_factory=list)  # per repeat: unit time / hand's
    vs_lightning: list[float] = field(default_factory=list)  # per repeat: Lightning's / this
    first_s: float | None = None
    diff: float | None = None
    close: bool | None = None
    mem_bytes: int | None = None
    mem_ratio: float | None = None
    syncs: int | None = None  # CUDA only: host syncs torch's sync debug mode saw in one unit
    note: str = ""


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return min(xs), max(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def host_syncs(runner: Any, unit: Any) -> int | None:
    """How many synchronizing CUDA operations (``.item()``, ``bool(tensor)``, a copy to the
    host, ...) one unit of ``runner`` makes, as counted by ``torch.cuda.set_sync_debug_mode
    ("warn")``; ``None`` for a contestant not driven a unit at a time (Lightning, fold)."""
    do_unit = getattr(runner, "do_unit", None)
    if do_unit is None:
        return None
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            do_unit(unit)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return sum("synchroniz" in str(m.message) for m in caught)


def time_workload(
    w: Workload,
    names: list[str],
    device: torch.device,
    repeats: int,
    steps: int,
    burn: int,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Check equivalence, then time the contestants interleaved; one :class:`Row` each.

    Contestants that do not apply to the workload (``lightning`` on the ensemble, the
    ``looplib_loop`` baseline on single models) get no row."""
    n_units = burn + steps
    problem = make_problem(w, device, pool_size=min(max(n_units, CHECK_UNITS + 1), 64))
    names = [n for n in names if applicable(n, w)]
    rows = {n: Row(w.key, n) for n in names}

    # 0. Warm the process (autograd engine, kernel caches) on a throwaway hand loop, so that
    # whichever contestant runs first does not pay for it in its first-unit time.
    build_hand(problem).run(problem.units(2), burn=1)

    # 1. Equivalence: CHECK_UNITS units from the same weights, parameters against hand's. This
    # first call from scratch also gives the first-unit time (compilation, Lightning's setup).
    check = problem.units(CHECK_UNITS)
    reference = None
    runners: dict[str, Any] = {}
    for n in ["hand", *[n for n in names if n != "hand"]]:
        try:
            c = build(n, problem)
            first = c.run(check, burn=1).first_s
        except Skip as e:
            if n in rows:
                rows[n].note = f"skipped: {e}"
            continue
        except Exception as e:  # a contestant that fails is reported, not fatal
            if n in rows:
                rows[n].note = f"failed: {type(e).__name__}: {e}"[:200]
            continue
        if n == "hand":
            reference = {k: v.detach().clone() for k, v in c.params().items()}
        elif reference is not None:
            rows[n].diff, rows[n].close = max_abs_diff(reference, c.params())
        if n in rows:
            rows[n].first_s = first
            rows[n].note = getattr(c, "note", lambda: "")()
            runners[n] = c  # keeps training from here in the timed repeats
    if "hand" in rows and "hand" in runners:
        rows["hand"].diff, rows["hand"].close = 0.0, True
    live = [n for n in names if n in runners]

    # 2. On CUDA, the host syncs of one unit (torch's sync debug mode; not timed).
    if device.type == "cuda":
        for n in live:
            rows[n].syncs = host_syncs(runners[n], problem.units(1, offset=CHECK_UNITS)[0])
    gc.collect()

    # 3. Interleaved repeats, the order rotated each repeat.
    for r in range(repeats):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        times: dict[str, float] = {}
        for n in order:
            units = problem.units(n_units, offset=r * n_units)
            times[n] = runners[n].run(units, burn=burn).timed_s / steps
        for n in live:
            rows[n].unit_s.append(times[n])
            if "hand" in times:
                rows[n].ratios.append(times[n] / times["hand"])
            if "lightning" in times:
                rows[n].vs_lightning.append(times["lightning"] / times[n])
        log(
            f"  {w.key} repeat {r + 1}/{repeats}: "
            + ", ".join(f"{n} {times[n] * 1e3:.3f} ms" for n in live)
        )
    return [rows[n] for n in names]


# ------------------------------------------------------------------------------- memory


def _status_kb(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _prime(name: str, w: Workload, device: torch.device) -> None:
    """Run the contestant's code once on a throwaway tiny problem shaped like ``w`` (its
    accumulation, clipping, ensemble), so that lazy imports and one-time initialisations of the
    library are not counted as training memory."""
    tiny = Workload(
        "prime",
        "",
        "",
        lambda: mlp(4, 10),
        batch=2,
        features=4,
        steps=2,
        burn=1,
        micro=w.micro,
        clip=w.clip,
        members=min(w.members, 2),
    )
    p = make_problem(tiny, device, pool_size=3)
    c = build(name, p)
    c.run(p.units(3), burn=1)
    del c, p
    gc.collect()


def memory_child(workload: str, name: str, device: torch.device, steps: int) -> dict[str, Any]:
    """In a fresh process: the peak memory growth of ``steps`` units of training, measured from
    a baseline taken after the data and the initial weights exist (and the library is primed).

    CPU: peak RSS (VmHWM, reset at the baseline) minus the RSS at the baseline; if the counter
    cannot be reset, ``ru_maxrss`` minus the baseline RSS (an upper bound). CUDA:
    ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus the allocated bytes at the
    baseline.
    """
    w = WORKLOADS[workload]
    _prime(name, w, device)
    problem = make_problem(w, device, pool_size=min(steps + 1, 64))
    units = problem.units(steps + 1)
    gc.collect()
    method = ""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        c = build(name, problem)
        c.run(units, burn=1)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        method = "cuda max_memory_allocated"
    else:
        reset = _reset_peak_rss()
        base_kb = _status_kb("VmRSS") or 0
        c = build(name, problem)
        c.run(units, burn=1)
        if reset and _status_kb("VmHWM") is not None:
            peak = ((_status_kb("VmHWM") or 0) - base_kb) * 1024
            method = "VmHWM growth"
        else:
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) * 1024
            method = "ru_maxrss growth (upper bound)"
    return {"workload": workload, "contestant": name, "peak_bytes": int(peak), "method": method}


def measure_memory(
    workload: str, name: str, device: str, steps: int, threads: int
) -> tuple[int | None, str]:
    """Run :func:`memory_child` in a fresh interpreter; returns (peak bytes or None, note)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-child",
        "--workloads",
        workload,
        "--contestants",
        name,
        "--device",
        device,
        "--steps",
        str(steps),
        "--threads",
        str(threads),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            out = json.loads(line)
            if "skip" in out:
                return None, out["skip"]
            return out["peak_bytes"], out["method"]
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return None, f"memory child failed: {tail[0][:160]}"


def attach_memory(
    rows: list[Row], device: str, steps: int, threads: int, log: Callable[[str], None] = print
) -> None:
    """Fill ``mem_bytes`` and ``mem_ratio`` (to hand's) for the rows that ran."""
    by_w: dict[str, dict[str, Row]] = {}
    for row in rows:
        by_w.setdefault(row.workload, {})[row.contestant] = row
    for wkey, group in by_w.items():
        for name, row in group.items():
            if not row.unit_s:  # skipped or failed in the timing run
                continue
            row.mem_bytes, method = measure_memory(wkey, name, device, steps, threads)
            log(f"  {wkey} {name}: peak memory growth {fmt_mb(row.mem_bytes)} MiB ({method})")
        hand = group.get("hand")
        for row in group.values():
            if hand and hand.mem_bytes and row.mem_bytes is not None:
                row.mem_ratio = row.mem_bytes / hand.mem_bytes


# ------------------------------------------------------------------------------- reporting


def fmt_mb(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"^Model name:\s+(.+)$", out, re.M)
        if m:
            model = m.group(1).strip()
    info = {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        )
        info["commit"] = rev.stdout.strip()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(Skip):
        info["lightning"] = import_lightning().__version__
    return info


def markdown(rows: list[Row], with_memory: bool) -> str:
    head = [
        "workload",
        "contestant",
        "ms / unit (median)",
        "ratio to hand: median",
        "ratio IQR",
        "ratio min..max",
        "speedup over lightning",
        "first unit (ms)",
    ]
    if with_memory:
        head += ["peak mem growth (MiB)", "mem ratio"]
    with_syncs = any(r.syncs is not None for r in rows)
    if with_syncs:
        head += ["host syncs / unit"]
    head += ["max abs diff vs hand", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.unit_s:
            med = statistics.median(r.unit_s) * 1e3
            rat = statistics.median(r.ratios) if r.ratios else float("nan")
            lo, hi = quartiles(r.ratios) if r.ratios else (float("nan"),) * 2
            cells = [
                f"{med:.3f}",
                f"{rat:.2f}x",
                f"{lo:.2f}..{hi:.2f}",
                f"{min(r.ratios):.2f}..{max(r.ratios):.2f}" if r.ratios else "-",
                f"{statistics.median(r.vs_lightning):.2f}x" if r.vs_lightning else "-",
                f"{r.first_s * 1e3:.1f}" if r.first_s is not None else "-",
            ]
        else:
            cells = ["-"] * 6
        if with_memory:
            cells += [
                fmt_mb(r.mem_bytes),
                f"{r.mem_ratio:.2f}x" if r.mem_ratio is not None else "-",
            ]
        if with_syncs:
            cells.append("-" if r.syncs is None else str(r.syncs))
        diff = "-" if r.diff is None else f"{r.diff:.1e}" + ("" if r.close else " MISMATCH")
        cells += [diff, r.note]
        lines.append("| " + " | ".join([r.workload, r.contestant, *cells]) + " |")
    return "\n".join(lines)


def to_json(rows: list[Row], info: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "machine": info,
        "settings": settings,
        "rows": [r.__dict__ for r in rows],
    }


# ------------------------------------------------------------------------------- CLI


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of W1..W5")
    ap.add_argument(
        "--contestants",
        default=None,
        help=f"comma list from {','.join(CONTESTANTS)} (default: all)",
    )
    ap.add_argument("--steps", type=int, default=None, help="timed units per repeat")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")


def default_contestants(names: Sequence[str], device: torch.device, quick: bool) -> list[str]:
    """The contestants run when ``--contestants`` is not given: CUDA graphs only on CUDA, and
    no compiling under ``--quick``."""
    return [
        n
        for n in names
        if not (quick and n in COMPILING)
        and not (n == "looplib_cudagraphs" and device.type != "cuda")
    ]


def setup(args: argparse.Namespace) -> torch.device:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    return device


def main() -> None:
    ap = argparse.ArgumentParser(description="memory child process (see bench_memory.py)")
    ap.add_argument("--memory-child", action="store_true", required=True)
    add_common_args(ap)
    args = ap.parse_args()
    device = setup(args)
    wkey = parse_list(args.workloads, list(WORKLOADS), "workloads")[0]
    name = parse_list(args.contestants or "hand", CONTESTANTS, "contestants")[0]
    steps = args.steps or WORKLOADS[wkey].steps
    warnings.simplefilter("ignore")
    try:
        out = memory_child(wkey, name, device, steps)
    except Skip as e:
        out = {"skip": f"skipped: {e}"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
