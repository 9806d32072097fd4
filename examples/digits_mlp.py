"""An MLP on scikit-learn's bundled handwritten digits: your model, your loss, looplib's loop.

Run it from a checkout (the data ships with scikit-learn: ``pip install looplib[demo]``)::

    python examples/digits_mlp.py            # the full run, about half a minute on a CPU
    python examples/digits_mlp.py --quick    # a few seconds

What it shows: a plain ``nn.Module`` and a loss function that returns metrics; a step built from
``train_step`` and a chain read in the order data flows (accumulate two batches, record the
gradient norm, clip, apply AdamW with a warmup-cosine schedule); ``fit`` with validation and
early stopping; ``evaluate`` on the test split; and a checkpoint round trip. The data helpers
come from :mod:`looplib.demo`, which ships with the package.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import looplib as ll
from looplib.demo import batches, load_digits


class MLP(nn.Module):
    def __init__(self, inputs: int = 64, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(inputs, hidden),
            nn.ReLU(),
            nn.Dropout(0.1),  # drawn from the key in the state: reproducible
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a small model: one thread is fastest

    data = load_digits(args.seed)
    torch.manual_seed(args.seed)
    model = MLP()
    max_epochs = 5 if args.quick else 60
    updates = max_epochs * 10  # 19 batches per epoch, two per update
    lr = ll.schedules.warmup_cosine(3e-3, warmup_steps=updates // 10, decay_steps=updates, end=1e-4)
    opt = ll.optim.adamw(lr=lr, weight_decay=1e-2)
    step = ll.chain(ll.accumulate(2), ll.track_norm(2), ll.clip(1.0))(
        ll.train_step(model, loss_fn, opt)
    )

    def train(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return batches(data.train, 64, torch.Generator().manual_seed(args.seed + epoch))

    result = ll.fit(
        step,
        ll.init(model, opt, seed=args.seed),
        train,
        val=batches(data.val, 256),
        max_epochs=max_epochs,
        stop=ll.early_stopping("val_loss", patience=5),
        progress=False,
    )
    for entry in result.history:
        print(
            f"epoch {int(entry['epoch']):3d}  loss {entry['loss']:.4f}  "
            f"val_loss {entry['val_loss']:.4f}  val_acc {entry['val_acc']:.4f}  "
            f"lr {entry['lr']:.2e}"
        )
    print(f"stopped: {result.stop_reason}")

    with tempfile.TemporaryDirectory() as tmp:  # saving the state is saving the whole run
        path = Path(tmp) / "digits.safetensors"
        ll.save(result.state, path)
        state = ll.load(path)
    test = ll.evaluate(step, state, batches(data.test, 256))
    print(f"test accuracy {test['acc']:.4f} (loss {test['loss']:.4f})")
    return test


if __name__ == "__main__":
    main()
