"""A character-level LSTM trained with truncated backpropagation through time (TBPTT).

Run it from a checkout (the text is Python's own bundled documentation, nothing is downloaded)::

    python examples/char_lstm_tbptt.py            # the full run, a minute or two on a CPU
    python examples/char_lstm_tbptt.py --quick    # a few seconds

The text is one long stream cut into ``batch`` parallel rows, as in PyTorch's word language
model: a batch is ``(inputs, targets)`` of shape ``(batch, time)``, batch-first. The step
``chain(tbptt_split(chunk), accumulate(2), clip(1.0))`` cuts each batch along time into chunks
of ``chunk`` characters; the LSTM's ``(h, c)`` carry flows from chunk to chunk, detached, so
gradients stop at chunk borders; two chunks make one update. The loss returns the carry.

(The demo, ``python -m looplib.demo --part text``, trains on variable-length paragraphs
instead: lists of sequences that end at different times.)
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import looplib as ll
from looplib.demo import paragraphs


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, embed: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor, carry=None):
        out, carry = self.lstm(self.embed(ids), carry)
        return self.head(out), carry


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], carry):
    """Called once per chunk with the carry of the previous chunk (None for the first)."""
    inputs, targets = batch
    logits, carry = model(inputs, carry)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return loss, {"bpc": loss / math.log(2)}, carry


def streams(text: str, rows: int, length: int) -> tuple[torch.Tensor, str]:
    """The text as ids, cut into ``rows`` parallel streams, and the vocabulary."""
    chars = "".join(sorted(set(text)))
    ids = torch.tensor([chars.index(c) for c in text])
    usable = (len(ids) - 1) // (rows * length) * (rows * length)
    return ids[: usable + 1], chars


def make_batches(ids: torch.Tensor, rows: int, length: int) -> list[tuple[torch.Tensor, ...]]:
    x = ids[:-1].reshape(rows, -1)
    y = ids[1:].reshape(rows, -1)
    return [(x[:, t : t + length], y[:, t : t + length]) for t in range(0, x.shape[1], length)]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small slice of text, 2 epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    chars_wanted = 40_000 if args.quick else 400_000
    text = " ".join(paragraphs())[:chars_wanted]
    rows, length, chunk = 16, 128, 32
    ids, vocab = streams(text, rows, length)
    cut = int(0.9 * len(ids)) // (rows * length) * (rows * length)
    train = make_batches(ids[: cut + 1], rows, length)
    val = make_batches(ids[cut:], 4, length)  # what is left, in 4 rows
    print(f"{len(text)} characters, {len(vocab)} symbols, {len(train)} batches of {rows}x{length}")

    torch.manual_seed(args.seed)
    model = CharLSTM(len(vocab), hidden=64 if args.quick else 128)
    opt = ll.optim.adam(lr=4e-3)
    step = ll.chain(ll.tbptt_split(chunk), ll.accumulate(2), ll.clip(1.0))(
        ll.train_step(model, loss_fn, opt)
    )
    result = ll.fit(
        step,
        ll.init(model, opt, seed=args.seed),
        train,
        val=val,
        max_epochs=2 if args.quick else 10,
        stop=ll.early_stopping("val_loss", patience=2),
        progress=False,
    )
    for entry in result.history:
        print(
            f"epoch {int(entry['epoch'])}  updates {int(entry['step'])}  "
            f"bpc {entry['bpc']:.3f}  val_bpc {entry['val_bpc']:.3f}"
        )
    print(f"stopped: {result.stop_reason}")
    return result.history[-1]


if __name__ == "__main__":
    main()
