"""A nanoGPT-style character transformer, trained with looplib.

The model is nanoGPT's GPT at toy size (pre-norm blocks, causal self-attention through
``F.scaled_dot_product_attention`` with dropout, a GELU MLP, the output layer tied to the token
embedding), trained on Python source text that ships with Python itself: a few modules of the
standard library, read at run time from ``sysconfig.get_paths()["stdlib"]``.

nanoGPT's ``train.py`` recipe, as a looplib chain::

    opt  = ll.optim.adamw(warmup_cosine(...), betas=(0.9, 0.95), weight_decay=0.1,
                          mask=lambda name, p: p.dim() >= 2)   # decay matrices and embeddings
    step = ll.chain(ll.accumulate(K), ll.clip(1.0), ll.ema(0.99))(ll.train_step(...))
    step = ll.compile(step)                              # unless --no-compile
    ll.fit(step, state, train, val, ...)                     # evaluates every epoch

An "epoch" here is an evaluation interval: ``eval_every`` optimizer updates on freshly drawn
random crops of the training text. Each evaluation prints the training loss, the validation loss
of the params and of their moving average, and the learning rate; a sample of generated text
closes the run.

Run it::

    python examples/nanogpt.py --quick              # eager, under a minute on 2 CPU cores
    python examples/nanogpt.py --quick --compile    # compiling first takes a minute or two
    python examples/nanogpt.py --steps 2000 --device cuda
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import looplib as ll

SOURCES = ("textwrap.py", "string.py", "abc.py", "bisect.py", "heapq.py", "functools.py")


@dataclass(frozen=True)
class Config:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.1
    batch_size: int = 32
    accumulate: int = 2
    steps: int = 2000
    eval_every: int = 200
    eval_batches: int = 8
    peak_lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    ema_decay: float = 0.99
    text_chars: int = 400_000


QUICK = Config(
    n_layer=2,
    n_head=2,
    n_embd=64,
    block_size=64,
    dropout=0.1,
    batch_size=16,
    accumulate=2,
    steps=240,
    eval_every=40,
    eval_batches=4,
    peak_lr=3e-3,
    min_lr=3e-4,
    warmup=20,
    ema_decay=0.9,
    text_chars=120_000,
)


# --------------------------------------------------------------------------- data


def load_text(limit: int) -> str:
    """Python source from the standard library (the same on every install of a version)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(stdlib / name).read_text(encoding="utf-8") for name in SOURCES]
    return "\n".join(parts)[:limit]


class Tokens:
    """Characters as integers, split 90/10 into training and validation text."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([self.index[c] for c in text], dtype=torch.int64)
        cut = int(0.9 * len(data))
        self.train, self.val = data[:cut], data[cut:]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def crops(data: torch.Tensor, n: int, cfg: Config, seed: int, device: str) -> list[Any]:
    """``n`` batches of random ``block_size`` windows (inputs, next-character targets)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        start = torch.randint(len(data) - cfg.block_size - 1, (cfg.batch_size,), generator=gen)
        x = torch.stack([data[i : i + cfg.block_size] for i in start.tolist()])
        y = torch.stack([data[i + 1 : i + 1 + cfg.block_size] for i in start.tolist()])
        batches.append((x.to(device), y.to(device)))
    return batches


# --------------------------------------------------------------------------- model


class SelfAttention(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        # Dropout on the attention weights draws from the state's key, like nn.Dropout.
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config, vocab: int) -> None:
        super().__init__()
        self.block_size = cfg.block_size
        self.wte = nn.Embedding(vocab, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one parameter, two uses
        self.apply(self._init)
        for name, p in self.named_parameters():  # nanoGPT's scaled init of residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def generate(model: GPT, params: dict[str, torch.Tensor], start: torch.Tensor, n: int, seed: int):
    """Sample ``n`` characters after ``start`` (temperature 0.8) with the given params."""
    gen = torch.Generator(device=start.device).manual_seed(seed)
    idx = start
    model.eval()
    for _ in range(n):
        logits = torch.func.functional_call(model, params, (idx[:, -model.block_size :],))
        probs = F.softmax(logits[:, -1, :] / 0.8, dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=gen)], dim=1)
    model.train()
    return idx[0].tolist()


# --------------------------------------------------------------------------- training


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a toy run: about a minute on CPU")
    parser.add_argument("--steps", type=int, default=None, help="optimizer updates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile each update as one graph (default: yes, but for --quick, where compiling "
        "takes longer than the whole run)",
    )
    parser.add_argument("--backend", default="inductor", help="the torch.compile backend")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    compiled = not args.quick if args.compile is None else args.compile
    steps = args.steps if args.steps is not None else cfg.steps
    eval_every = min(cfg.eval_every, steps)
    epochs = math.ceil(steps / eval_every)

    torch.manual_seed(args.seed)
    if args.device == "cpu":
        # Early in training some values (Adam's second moments of rarely seen characters) are
        # subnormal floats, which x86 CPUs compute an order of magnitude slower.
        torch.set_flush_denormal(True)
    tokens = Tokens(load_text(cfg.text_chars))
    model = GPT(cfg, len(tokens.chars)).to(args.device)
    lr = ll.schedules.warmup_cosine(
        cfg.peak_lr, warmup_steps=cfg.warmup, decay_steps=steps, end=cfg.min_lr
    )
    opt = ll.optim.adamw(lr, betas=(0.9, 0.95), weight_decay=0.1, mask=lambda n, p: p.dim() >= 2)
    step = ll.chain(ll.accumulate(cfg.accumulate), ll.clip(1.0), ll.ema(cfg.ema_decay))(
        ll.train_step(model, loss_fn, opt)
    )
    run = ll.compile(step, backend=args.backend) if compiled else step
    state = ll.init(model, opt, seed=args.seed)
    n_params = sum(p.numel() for p in state.params.values())
    print(
        f"{len(tokens.train) + len(tokens.val)} characters, vocabulary {len(tokens.chars)}, "
        f"{n_params} parameters, {steps} updates of {cfg.accumulate} x {cfg.batch_size} "
        f"sequences, {'compiled' if compiled else 'eager'} on {args.device}",
        flush=True,
    )

    def train(epoch: int) -> list[Any]:  # fresh random crops every epoch
        micro = eval_every * cfg.accumulate
        return crops(tokens.train, micro, cfg, seed=args.seed * 1000 + epoch, device=args.device)

    val = crops(tokens.val, cfg.eval_batches, cfg, seed=-1 - args.seed, device=args.device)
    started = time.perf_counter()

    def report(state: ll.TrainState, entry: dict[str, float]) -> None:
        ema_val = ll.evaluate(step, ll.with_ema_params(state), val)["loss"]
        entry["ema_val_loss"] = ema_val
        print(
            f"step {int(entry['step']):5d}  loss {entry['loss']:.4f}  val_loss "
            f"{entry['val_loss']:.4f}  ema_val_loss {ema_val:.4f}  lr {entry['lr']:.2e}  "
            f"({time.perf_counter() - started:.1f} s)",
            flush=True,
        )

    result = ll.fit(
        run,
        state,
        train,
        val,
        max_epochs=epochs,
        max_steps=steps,
        stop=None,
        progress=False,
        on_epoch_end=report,
    )
    start = torch.tensor([[tokens.index["d"], tokens.index["e"], tokens.index["f"]]])
    text = generate(model, ll.ema_params(result.state), start.to(args.device), 200, args.seed)
    print(f"stopped: {result.stop_reason}\n--- sample (EMA params) ---\n{tokens.decode(text)}")
    return result.history


if __name__ == "__main__":
    main(sys.argv[1:])
