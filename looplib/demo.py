"""looplib end to end, on real data that ships with installed packages (nothing is downloaded).

Run it with ``python -m looplib.demo`` (``--help`` lists the flags). It has two parts:

``digits``
    An MLP on scikit-learn's bundled handwritten digits (1797 8x8 images, ``pip install
    looplib[demo]``): a seeded train/validation/test split, standardized pixels, the step
    ``chain(accumulate(2), track_norm(2), clip(1.0))(train_step(...))`` with AdamW, ``fit`` with
    validation and early stopping on ``val_loss``, then the test accuracy from ``evaluate``.

``text``
    A character-level LSTM language model on the documentation texts that ship with Python
    (``pydoc_data.topics``), cut into paragraphs of 40 to 400 characters. Each batch is a pair of
    lists of variable-length sequences, ``(inputs, targets)``, and the step
    ``chain(tbptt_split(32), accumulate(2), track_norm(2), clip(1.0))`` runs it as chunks of 32
    characters with the LSTM state carried (detached) from chunk to chunk. A sequence that has
    ended before the others gives empty pieces; :func:`run_rnn` runs only the non-empty ones and
    passes the carry of the others through unchanged. Losses are reported in bits per character,
    and the trained model writes a short sample.

:func:`main` prints each epoch history as a table, the stop reason, the test accuracy or bits
per character, and the run time, and returns all of it as a dict.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_sequence, unpack_sequence

import looplib as ll

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor]
TextBatch = tuple[list[Tensor], list[Tensor]]

MISSING_SKLEARN = (
    "looplib.demo: the digits part needs scikit-learn, which is not installed. Install the demo "
    "extra with `pip install looplib[demo]` (or `pip install scikit-learn`), or run only the "
    "text part with `python -m looplib.demo --part text`."
)
GRAD_NORM = "grad_2.0_norm_total"
"""The metric ``track_norm(2)`` writes: the global 2-norm of the (accumulated) gradient."""


# -- the settings -----------------------------------------------------------------------------
class DigitsConfig(NamedTuple):
    """Settings of the digits part (the defaults are the full run)."""

    hidden: int = 256
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    min_epochs: int = 10
    max_epochs: int = 100
    patience: int = 8
    val_fraction: float = 0.15
    test_fraction: float = 0.2


class TextConfig(NamedTuple):
    """Settings of the text part (the defaults are the full run)."""

    sequences: int = 800
    min_chars: int = 40
    max_chars: int = 400
    val_fraction: float = 0.1
    batch_size: int = 16
    chunk: int = 32
    embed: int = 32
    hidden: int = 128
    lr: float = 4e-3
    max_epochs: int = 15
    patience: int = 2
    sample_chars: int = 160


QUICK_DIGITS = DigitsConfig(min_epochs=1, max_epochs=10, patience=3)
QUICK_TEXT = TextConfig(sequences=64, hidden=64, max_epochs=3, patience=2, sample_chars=60)


# -- output -----------------------------------------------------------------------------------
def format_history(history: Sequence[dict[str, float]], columns: Sequence[str]) -> str:
    """A fixed-width table of ``history`` (one row per epoch) restricted to ``columns``."""
    names = {GRAD_NORM: "grad_norm"}
    heads = [names.get(c, c) for c in columns]
    width = [max(9, len(h)) for h in heads]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, width, strict=True))]
    for entry in history:
        cells = []
        for column, w in zip(columns, width, strict=True):
            value = entry.get(column, math.nan)
            if column in ("epoch", "step"):
                cells.append(f"{int(value)}".rjust(w))
            elif column == "time":
                cells.append(f"{value:.2f}s".rjust(w))
            else:
                cells.append(f"{value:.4f}".rjust(w))
        lines.append("  ".join(cells))
    return "\n".join(lines)


# -- part 1: handwritten digits ---------------------------------------------------------------
class Digits(NamedTuple):
    """The digits, split and standardized: ``(x, y)`` pairs of float32 images and int64 labels."""

    train: Batch
    val: Batch
    test: Batch


def load_digits(seed: int, val_fraction: float = 0.15, test_fraction: float = 0.2) -> Digits:
    """scikit-learn's 8x8 digits as tensors, split by a seeded permutation.

    Features are standardized with the training split's per-pixel mean and standard deviation
    (pixels that are constant in the training split are only centered).
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError(MISSING_SKLEARN) from error
    data = sklearn_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32)
    y = torch.as_tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(y))
    n_val = round(val_fraction * len(y))
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    mean = x[train].mean(0)
    std = x[train].std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x = (x - mean) / std
    return Digits((x[train], y[train]), (x[val], y[val]), (x[test], y[test]))


def batches(data: Batch, size: int, generator: torch.Generator | None = None) -> list[Batch]:
    """Cut ``(x, y)`` into batches of ``size`` rows, shuffled when a generator is given."""
    x, y = data
    order = torch.randperm(len(y), generator=generator) if generator else torch.arange(len(y))
    return [(x[i], y[i]) for i in order.split(size)]


def mlp(inputs: int, hidden: int, classes: int) -> nn.Module:
    """A two-hidden-layer perceptron."""
    return nn.Sequential(
        nn.Linear(inputs, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def classification_loss(model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy, and the accuracy as a metric."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def run_digits(
    seed: int = 0, config: DigitsConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train and test the digits MLP; returns the history, stop reason and test metrics."""
    config = DigitsConfig() if config is None else config
    started = time.perf_counter()
    data = load_digits(seed, config.val_fraction, config.test_fraction)
    torch.manual_seed(seed)
    model = mlp(64, config.hidden, 10)
    opt = ll.optim.adamw(lr=config.lr, weight_decay=config.weight_decay)
    # Read the chain in the order data flows: two batches are accumulated into one gradient,
    # whose norm is recorded (before clipping), then clipped to norm 1, then applied by AdamW.
    step = ll.chain(ll.accumulate(2), ll.track_norm(2), ll.clip(1.0))(
        ll.train_step(model, classification_loss, opt)
    )

    def train_batches(epoch: int) -> list[Batch]:
        return batches(data.train, config.batch_size, torch.Generator().manual_seed(seed + epoch))

    # The state is an immutable pytree, so keeping the best one is keeping a reference.
    best: dict[str, Any] = {}

    def keep_best(state: ll.TrainState, entry: dict[str, float]) -> None:
        if not best or entry["val_loss"] < best["val_loss"]:
            best.update(val_loss=entry["val_loss"], epoch=int(entry["epoch"]), state=state)

    val = batches(data.val, 256)
    result = ll.fit(
        step,
        ll.init(model, opt),
        train_batches,
        val=val,
        min_epochs=config.min_epochs,
        max_epochs=config.max_epochs,
        stop=ll.early_stopping("val_loss", patience=config.patience),
        progress=progress,
        on_epoch_end=keep_best,
    )
    test_batches = batches(data.test, 256)
    test = ll.evaluate(step, best["state"], test_batches)
    last = ll.evaluate(step, result.state, test_batches)
    return {
        "history": result.history,
        "stop_reason": result.stop_reason,
        "best_epoch": best["epoch"],
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "last_test_acc": last["acc"],
        "sizes": {name: len(part[1]) for name, part in data._asdict().items()},
        "state": result.state,
        "seconds": time.perf_counter() - started,
    }


# -- part 2: a character-level LSTM with truncated BPTT ---------------------------------------
class Vocab(NamedTuple):
    """The characters of the corpus, in sorted order, and their ids."""

    chars: str
    ids: dict[str, int]

    def encode(self, text: str) -> Tensor:
        return torch.tensor([self.ids[c] for c in text], dtype=torch.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def paragraphs(min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """The paragraphs of Python's bundled documentation texts (``pydoc_data.topics``).

    Paragraphs are separated by blank lines; whitespace inside one collapses to single spaces,
    and only those of ``min_chars`` to ``max_chars`` characters are kept, in a fixed order.
    """
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(block.split())
            if min_chars <= len(text) <= max_chars:
                out.append(text)
    return out


def text_data(
    seed: int, config: TextConfig
) -> tuple[Vocab, list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    """A seeded sample of ``config.sequences`` paragraphs as (input, target) id pairs.

    The target of a paragraph is its input shifted by one character, so a paragraph of ``n``
    characters gives ``n - 1`` predictions. Returns the vocabulary and the train and validation
    pairs.
    """
    texts = paragraphs(config.min_chars, config.max_chars)
    pick = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    chosen = [texts[i] for i in pick[: config.sequences].tolist()]
    chars = "".join(sorted(set("".join(chosen))))
    vocab = Vocab(chars, {c: i for i, c in enumerate(chars)})
    pairs = [(ids[:-1], ids[1:]) for ids in (vocab.encode(t) for t in chosen)]
    n_val = max(1, round(config.val_fraction * len(pairs)))
    return vocab, pairs[n_val:], pairs[:n_val]


def text_batches(
    pairs: Sequence[tuple[Tensor, Tensor]],
    size: int,
    generator: torch.Generator | None = None,
    window: int = 8,
) -> list[TextBatch]:
    """Group (input, target) pairs into batches ``(inputs, targets)`` of two lists of tensors.

    Without a generator, the pairs are sorted by length and cut into batches. With one, they are
    shuffled, sorted by length within windows of ``window`` batches (so a batch holds sequences
    of similar, not equal, lengths and needs fewer time chunks), cut, and the batches shuffled.
    """
    lengths = [int(x.shape[0]) for x, _ in pairs]
    if generator is None:
        order = sorted(range(len(pairs)), key=lambda i: lengths[i])
    else:
        shuffled = torch.randperm(len(pairs), generator=generator).tolist()
        span = size * window
        order = []
        for start in range(0, len(shuffled), span):
            order += sorted(shuffled[start : start + span], key=lambda i: lengths[i])
    groups = [order[start : start + size] for start in range(0, len(order), size)]
    if generator is not None:
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    return [([pairs[i][0] for i in g], [pairs[i][1] for i in g]) for g in groups]


Carry = Any  # a tensor (GRU, RNN) or a tuple of tensors (LSTM), each (layers, batch, hidden)


def run_rnn(rnn: nn.RNNBase, seqs: Sequence[Tensor], hx: Carry) -> tuple[list[Tensor], Carry]:
    """Run ``rnn`` over variable-length sequences, some possibly empty, from the carry ``hx``.

    ``seqs`` holds one ``(length, features)`` tensor per row of ``hx`` (``(layers, batch,
    hidden)``, a tuple of two for an LSTM). The non-empty sequences run together as one packed
    batch; the rows of ``hx`` that belong to empty sequences pass through unchanged. Nothing is
    written in place, so gradients flow through the new carry. In plain Python::

        outputs, new = [], []
        for seq, h in zip(seqs, rows_of(hx)):
            out, h = rnn(seq, h) if len(seq) else (empty, h)
            outputs.append(out); new.append(h)

    Returns:
        the output of each sequence, ``(length, hidden)`` (``(0, hidden)`` for an empty one),
        and the new carry, in the order of ``seqs``.
    """
    rows = hx if isinstance(hx, tuple) else (hx,)
    empty = rows[0].new_zeros((0, rnn.hidden_size * (2 if rnn.bidirectional else 1)))
    live = [i for i, s in enumerate(seqs) if s.shape[0] > 0]
    if not live:
        return [empty for _ in seqs], hx
    if len(live) == len(seqs):
        out, new = rnn(pack_sequence(list(seqs), enforce_sorted=False), hx)
        return list(unpack_sequence(out)), new
    index = torch.tensor(live, device=rows[0].device)
    sub = tuple(h.index_select(1, index) for h in rows)
    packed = pack_sequence([seqs[i] for i in live], enforce_sorted=False)
    out, new = rnn(packed, sub if isinstance(hx, tuple) else sub[0])
    new_rows = new if isinstance(new, tuple) else (new,)
    merged = tuple(h.index_copy(1, index, n) for h, n in zip(rows, new_rows, strict=True))
    outputs = [empty for _ in seqs]
    for i, piece in zip(live, unpack_sequence(out), strict=True):
        outputs[i] = piece
    return outputs, merged if isinstance(hx, tuple) else merged[0]


class CharLSTM(nn.Module):
    """Embedding, a one-layer LSTM and a linear read-out, over lists of id sequences."""

    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(
        self, seqs: Sequence[Tensor], carry: tuple[Tensor, Tensor] | None
    ) -> tuple[list[Tensor], tuple[Tensor, Tensor]]:
        """Logits ``(length, vocab)`` for each sequence, and the new ``(h, c)``.

        ``carry=None`` starts from zeros; empty sequences keep their rows of the carry.
        """
        if carry is None:
            zeros = self.head.weight.new_zeros((1, len(seqs), self.lstm.hidden_size))
            carry = (zeros, zeros)
        lengths = [int(s.shape[0]) for s in seqs]
        embedded = self.embed(torch.cat(list(seqs))).split(lengths)
        outputs, carry = run_rnn(self.lstm, embedded, carry)
        return list(self.head(torch.cat(outputs)).split(lengths)), carry


LN2 = math.log(2.0)


def char_loss(model: nn.Module, batch: TextBatch, carry: Any) -> ll.LossOutput:
    """Token-mean cross-entropy of one chunk, weighted by its number of tokens.

    A chunk without tokens (possible only with a custom split) has loss 0 and weight 0, and so
    contributes nothing, without a NaN.
    """
    inputs, targets = batch
    logits, carry = model(inputs, carry)
    tokens = sum(int(t.shape[0]) for t in targets)
    flat, target = torch.cat(logits), torch.cat(targets)
    total = F.cross_entropy(flat, target, reduction="sum")
    loss = total / max(tokens, 1)
    correct = (flat.argmax(-1) == target).sum()
    metrics = {"bpc": loss / LN2, "acc": correct / max(tokens, 1)}
    return ll.LossOutput(loss, metrics, carry=carry, weight=tokens)


@torch.no_grad()
def generate(
    model: CharLSTM,
    state: ll.TrainState,
    vocab: Vocab,
    prompt: str,
    length: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` by ``length`` characters with the params of ``state``.

    ``temperature=0`` picks the most likely character each time; a positive temperature samples
    from ``softmax(logits / temperature)`` with a generator seeded by ``seed``.
    """
    tensors = {**state.params, **state.buffers}
    generator = torch.Generator().manual_seed(seed)

    def forward(ids: Tensor, carry: Any) -> tuple[list[Tensor], Any]:
        return torch.func.functional_call(model, tensors, ([ids], carry))

    known = "".join(c for c in prompt if c in vocab.ids) or vocab.chars[0]
    logits, carry = forward(vocab.encode(known), None)
    out: list[int] = []
    for _ in range(length):
        last = logits[0][-1]
        if temperature == 0:
            nxt = int(last.argmax())
        else:
            probs = torch.softmax(last / temperature, -1)
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        out.append(nxt)
        logits, carry = forward(torch.tensor([nxt]), carry)
    return known + vocab.decode(out)


def run_text(
    seed: int = 0, config: TextConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train the character LSTM with truncated BPTT; returns the history, stop reason and samples."""
    config = TextConfig() if config is None else config
    started = time.perf_counter()
    vocab, train, val = text_data(seed, config)
    torch.manual_seed(seed)
    model = CharLSTM(len(vocab.chars), config.embed, config.hidden)
    opt = ll.optim.adamw(lr=config.lr, weight_decay=0.0)
    # Each batch is cut into chunks of `config.chunk` characters (per sequence); each chunk is a
    # micro-batch weighted by its token count; two chunks make one update, whose gradient norm is
    # recorded and then clipped to 1. The (h, c) carry flows between the chunks of a batch.
    step = ll.chain(ll.tbptt_split(config.chunk), ll.accumulate(2), ll.track_norm(2), ll.clip(1.0))(
        ll.train_step(model, char_loss, opt)
    )

    def train_batches(epoch: int) -> list[TextBatch]:
        generator = torch.Generator().manual_seed(seed + epoch)
        return text_batches(train, config.batch_size, generator)

    result = ll.fit(
        step,
        ll.init(model, opt),
        train_batches,
        val=text_batches(val, 64),
        max_epochs=config.max_epochs,
        stop=ll.early_stopping("val_loss", patience=config.patience),
        progress=progress,
    )
    prompt = "The "
    return {
        "history": result.history,
        "stop_reason": result.stop_reason,
        "val_bpc": result.history[-1]["val_bpc"],
        "vocab": len(vocab.chars),
        "sizes": {
            "train": len(train),
            "val": len(val),
            "train_chars": sum(len(x) for x, _ in train),
            "val_chars": sum(len(x) for x, _ in val),
        },
        "greedy": generate(model, result.state, vocab, prompt, config.sample_chars),
        "sample": generate(
            model, result.state, vocab, prompt, config.sample_chars, temperature=0.7, seed=seed
        ),
        "state": result.state,
        "seconds": time.perf_counter() - started,
    }


# -- the command line -------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m looplib.demo",
        description="Train an MLP on handwritten digits and a character LSTM on Python's "
        "documentation with looplib, on data that ships with the installed packages.",
    )
    parser.add_argument(
        "--part", choices=["digits", "text", "all"], default="all", help="what to run"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the splits, init and order")
    parser.add_argument(
        "--quick", action="store_true", help="tiny settings, a smoke test of a few seconds"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads while the demo runs (default 1: these small models gain "
        "nothing from more, and lose much on a busy machine); 0 keeps torch's setting",
    )
    return parser


def _report(title: str, result: dict[str, Any], columns: Sequence[str], say: Callable) -> None:
    say(f"\n== {title} ==")
    say(format_history(result["history"], columns))
    say(f"stopped: {result['stop_reason']}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo from command-line arguments; print the results and return them.

    Returns:
        ``{"digits": {...}, "text": {...}, "seconds": float, "cpu_seconds": float}`` with the
        parts that ran. Each part holds its ``history``, ``stop_reason``, final ``state`` and
        ``seconds``; ``digits`` also ``test_acc`` and ``test_loss`` (of the params with the best
        ``val_loss``, from epoch ``best_epoch``) and ``last_test_acc`` (of the final params);
        ``text`` also ``val_bpc``, ``greedy`` and ``sample``.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    cpu = time.process_time()
    progress = not args.no_progress
    out: dict[str, Any] = {}
    if args.part in ("digits", "all"):
        digits = run_digits(args.seed, QUICK_DIGITS if args.quick else None, progress)
        columns = ["epoch", "step", "loss", "acc", "val_loss", "val_acc", GRAD_NORM, "time"]
        sizes = ", ".join(f"{k} {n}" for k, n in digits["sizes"].items())
        _report(f"digits: MLP on 8x8 handwritten digits ({sizes})", digits, columns, print)
        print(
            f"test accuracy {digits['test_acc']:.4f} (loss {digits['test_loss']:.4f}) with the "
            f"params of epoch {digits['best_epoch']}, the best val_loss; "
            f"{digits['last_test_acc']:.4f} with the last params"
        )
        print(f"digits took {digits['seconds']:.1f}s")
        out["digits"] = digits
    if args.part in ("text", "all"):
        text = run_text(args.seed, QUICK_TEXT if args.quick else None, progress)
        s = text["sizes"]
        title = (
            f"text: character LSTM, truncated BPTT ({s['train']} train paragraphs, "
            f"{s['train_chars']} chars; {s['val']} validation, {s['val_chars']} chars; "
            f"{text['vocab']} symbols)"
        )
        columns = ["epoch", "step", "loss", "bpc", "val_loss", "val_bpc", "val_acc", GRAD_NORM]
        _report(title, text, [*columns, "time"], print)
        print(f"validation bits per char {text['val_bpc']:.3f}")
        print(f"greedy:  {text['greedy']!r}")
        print(f"sampled: {text['sample']!r}")
        print(f"text took {text['seconds']:.1f}s")
        out["text"] = text
    out["seconds"] = time.perf_counter() - started
    out["cpu_seconds"] = time.process_time() - cpu
    print(f"\ntotal {out['seconds']:.1f}s ({out['cpu_seconds']:.1f}s of CPU time)")
    return out


if __name__ == "__main__":
    main()
