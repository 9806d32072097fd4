"""``tbptt_split``: truncated backpropagation through time, one chunk of each batch at a time."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from . import _validate as v
from ._step import Split
from ._transform import Transformer, split_transformer


def _longest(lengths: list[int]) -> int:
    """The largest of ``lengths``, 0 for none (a plain loop: the compiler traces it)."""
    longest = 0
    for n in lengths:
        longest = n if n > longest else longest
    return longest


def _time_length(node: Any, top: bool) -> int:
    """The longest time axis under ``node`` (0 where there is none)."""
    if isinstance(node, torch.Tensor):
        return int(node.shape[1]) if node.dim() >= 2 else 0
    if isinstance(node, Mapping):
        return _longest([_time_length(x, False) for x in node.values()])
    if (
        isinstance(node, list)
        and not top
        and node
        and all(isinstance(x, torch.Tensor) for x in node)
    ):
        return _longest([int(x.shape[0]) if x.dim() >= 1 else 0 for x in node])
    if isinstance(node, (list, tuple)):
        return _longest([_time_length(x, False) for x in node])
    return 0


def _chunk(node: Any, start: int, stop: int, top: bool) -> Any:
    if isinstance(node, torch.Tensor):
        return node[:, start:stop] if node.dim() >= 2 else node
    if isinstance(node, Mapping):
        rebuild: Any = type(node)
        return rebuild((key, _chunk(x, start, stop, False)) for key, x in node.items())
    if (
        isinstance(node, list)
        and not top
        and node
        and all(isinstance(x, torch.Tensor) for x in node)
    ):
        return [x[start:stop] if x.dim() >= 1 else x for x in node]
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*(_chunk(x, start, stop, False) for x in node))
    if isinstance(node, (list, tuple)):
        return type(node)(_chunk(x, start, stop, False) for x in node)
    return node


def split_time(batch: Any, steps: int) -> list[Any]:
    """The default split of :func:`tbptt_split`: cut a batch along time into chunks of ``steps``.

    The layout rules:

    * a tensor with two or more dims is batch-first, time on dim 1: ``x[:, t:t + steps]``;
    * a list of tensors inside the batch (``(seqs, targets)`` with ``seqs`` a list) holds
      variable-length sequences, time on dim 0 of each, and each sequence is cut on its own
      length (a sequence that has ended gives empty pieces);
    * tuples, dicts and the top-level container are walked; anything else (0-d or 1-d tensors
      such as per-sample labels, numbers, strings) goes unchanged into every chunk.

    The number of chunks is ``ceil(T / steps)`` for the longest time axis ``T`` in the batch,
    the last chunk possibly shorter: nothing is ever dropped, and concatenating the chunks along
    time gives the batch back.

    >>> [c.shape[1] for c in split_time(torch.zeros(2, 5, 3), 2)]
    [2, 2, 1]
    >>> [[len(s) for s in c[0]] for c in split_time(([torch.zeros(3), torch.zeros(6)],), 4)]
    [[3, 4], [0, 2]]
    """
    length = _time_length(batch, True)
    return [_chunk(batch, t, t + steps, True) for t in range(0, length, steps)]


def tbptt_split(
    steps: int, split: Callable[[Any, int], Sequence[Any]] | None = None
) -> Transformer:
    """Truncated backpropagation through time: run each batch as chunks of ``steps`` time steps.

    Each batch is cut by ``split(batch, steps)`` (default :func:`split_time`) and the chunks run
    in order, each as a micro-batch: the loss is called as ``loss_fn(model, chunk, carry)`` and
    returns ``(loss, metrics, carry)`` (or ``LossOutput(..., carry=...)``). The carry starts as
    ``None`` at every batch and is detached between chunks, so gradients stop at chunk borders.
    Without ``accumulate`` each chunk is one optimizer update; inside
    ``chain(tbptt_split(k), accumulate(K))`` each chunk is one of the K micro-batches. As
    everywhere, ``state.metrics`` describe the last update: its chunk's loss metrics, or the
    weighted mean over the chunks of its accumulation window (``fit``'s history averages over
    the whole epoch).

    Args:
        steps: time steps per chunk, a positive int.
        split: ``(batch, steps) -> list of chunks``, to override the layout rules.

    Returns:
        a transformer; it must come first in a chain (it splits batches, the others act on
        gradients).

    Example:
        >>> import looplib as ll
        >>> ll.tbptt_split(16)
        tbptt_split(16)
    """
    steps = v.positive_int("tbptt_split", "steps", steps)
    if split is not None:
        v.is_callable("tbptt_split", "split", split, "a function (batch, steps) -> list of chunks")
    cut = split_time if split is None else split
    name = (
        f"tbptt_split({steps})"
        if split is None
        else f"tbptt_split({steps}, split={getattr(split, '__name__', 'fn')})"
    )

    def run(batch: Any) -> Sequence[Any]:
        chunks = cut(batch, steps)
        if not isinstance(chunks, Sequence) or len(chunks) == 0:
            v.fail(
                "tbptt_split",
                "split",
                "must return a non-empty list of chunks (a batch without a time axis?)",
                chunks,
            )
        return chunks

    return split_transformer(Split(name, run))
