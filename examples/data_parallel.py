"""Data parallel training with ``torchrun``: every rank trains on its share of each epoch.

Run it from a checkout, on CPU with the gloo backend (``pip install looplib[demo]`` for the
digits)::

    torchrun --nproc_per_node=2 examples/data_parallel.py --quick
    torchrun --nproc_per_node=2 examples/data_parallel.py          # the full run

On GPUs, pass ``--backend nccl`` and run one process per GPU (``--nproc_per_node=8``): each rank
then uses ``cuda:LOCAL_RANK``.

What it shows: ``ll.pmean()`` in the chain averages the accumulated gradient over the ranks,
weighted by their sample counts, once per update, before it is clipped, so N ranks take the
update of one process on all their samples. ``fit`` broadcasts the initial state from rank 0,
gives rank r of N the batches ``r, r + N, ...`` of each epoch, averages the metrics over the
ranks (every rank sees the same history and stops at the same epoch), and prints progress on
rank 0 only. At the end every rank checks that it holds the same state.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import looplib as ll
from looplib.demo import batches, load_digits


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("launch with torchrun, e.g. torchrun --nproc_per_node=2 " + __file__)
    torch.set_num_threads(1)
    dist.init_process_group(args.backend, timeout=datetime.timedelta(minutes=2))
    try:
        _, size = ll.world()
        device = torch.device("cpu")
        if args.backend == "nccl":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)

        data = load_digits(seed=0)  # every rank loads the same split
        torch.manual_seed(0)  # the same initial model everywhere (fit broadcasts rank 0's anyway)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
        opt = ll.optim.adamw(lr=2e-3, weight_decay=1e-2)
        step = ll.chain(ll.accumulate(2), ll.pmean(), ll.track_norm(2), ll.clip(1.0))(
            ll.train_step(model, loss_fn, opt)
        )

        def on_device(parts):
            return [(x.to(device), y.to(device)) for x, y in parts]

        def train(epoch: int):  # the same shuffle on every rank; fit takes every size-th batch
            return on_device(batches(data.train, 32, torch.Generator().manual_seed(epoch)))

        result = ll.fit(
            step,
            ll.init(model, opt, seed=0),
            train,
            val=on_device(ll.shard(batches(data.val, 32))),  # each rank validates its share
            max_epochs=4 if args.quick else 40,
            stop=ll.early_stopping("val_loss", patience=4),
            progress=False,
        )
        ll.check_same_state(result.state)  # raises if the ranks' states differ
        test = ll.evaluate(step, result.state, on_device(ll.shard(batches(data.test, 32))))
        if ll.is_main_process():
            for e in result.history:
                print(
                    f"epoch {int(e['epoch'])}  updates {int(e['step'])}  loss {e['loss']:.4f}  "
                    f"val_loss {e['val_loss']:.4f}  val_acc {e['val_acc']:.4f}"
                )
            print(f"stopped: {result.stop_reason}")
            print(f"{size} ranks; test accuracy {test['acc']:.4f}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
