"""A learning-rate sweep as one ensemble: 8 MLPs trained together with ``ll.vmap``.

Run it from a checkout (``pip install looplib[demo]`` for scikit-learn's digits)::

    python examples/ensemble_sweep.py            # the full run, under a minute on a CPU
    python examples/ensemble_sweep.py --quick    # a few seconds

Each member has its own initial weights, its own dropout key, its own shuffle of the training
data and its own learning rate. ``ll.stack`` turns the 8 states into one whose every leaf has a
leading member axis, ``ll.vmap(step, batch_axis=0)`` trains all 8 at once (member ``i`` reads
``batch[i]`` of every tensor in the batch), and ``ll.fold`` runs it over the batches, one epoch
at a time. The result equals 8 separate runs, in one process and one set of kernels.

The learning rate travels in the batch: SGD is linear in the gradient, so scaling member i's
loss by ``lr[i]`` and using ``sgd(lr=1.0, momentum=0.9)`` takes exactly the steps of
``sgd(lr=lr[i], momentum=0.9)``. (This trick needs an optimizer whose update is linear in the
gradient; Adam's is not.) The loss reports the unscaled cross-entropy as ``ce``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import looplib as ll
from looplib.demo import load_digits

MEMBERS = 8


def make_model(seed: int, hidden: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 10))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
    x, y, lr = batch  # one member's slice: x (B, 64), y (B,), lr a 0-d tensor
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    return ll.LossOutput(
        lr * ce, {"ce": ce, "acc": (logits.argmax(-1) == y).float().mean()}, weight=len(y)
    )


def member_batches(
    data: tuple[torch.Tensor, torch.Tensor], lrs: torch.Tensor, size: int, epoch: int | None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches with a leading member axis: member i's own shuffle (or all in order)."""
    x, y = data
    n = len(y) // size * size  # equal batches for every member
    if epoch is None:
        order = torch.arange(n).expand(MEMBERS, n)
    else:
        order = torch.stack(
            [
                torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 * i + epoch))[
                    :n
                ]
                for i in range(MEMBERS)
            ]
        )
    return [(x[idx], y[idx], lrs) for idx in order.split(size, dim=1)]


def main(argv: list[str] | None = None) -> torch.Tensor:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    data = load_digits(seed=0)
    lrs = torch.logspace(-3, -0.5, MEMBERS)  # 0.001 ... 0.316
    opt = ll.optim.sgd(lr=1.0, momentum=0.9)
    models = [make_model(seed) for seed in range(MEMBERS)]
    step = ll.vmap(ll.train_step(models[0], loss_fn, opt), batch_axis=0)
    state = ll.stack([ll.init(m, opt, seed=seed) for seed, m in enumerate(models)])

    epochs = 3 if args.quick else 30
    for epoch in range(epochs):
        state = ll.fold(step, state, member_batches(data.train, lrs, 64, epoch))
    test = member_batches(data.test, lrs, len(data.test[1]), None)[0]
    metrics = step.evaluate(state, test)  # one value per member

    print(f"{MEMBERS} members trained together for {epochs} epochs ({int(state.step[0])} updates)")
    print("member        lr   test acc   test ce")
    for i in range(MEMBERS):
        print(
            f"{i:6d}  {lrs[i].item():8.4f}   {metrics['acc'][i].item():8.4f}  "
            f"{metrics['ce'][i].item():8.4f}"
        )
    best = int(metrics["acc"].argmax())
    print(f"best: member {best}, lr {lrs[best].item():.4f}")
    return metrics["acc"]


if __name__ == "__main__":
    main()
