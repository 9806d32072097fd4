"""Pure optimizers as ``(init, update)`` pairs with ``torch.optim``'s arithmetic.

Each factory checks its hyperparameters at once and returns an :class:`~looplib._types.Optimizer`:

* ``init(params)`` builds the state, a NamedTuple of tensors (``count`` and per-parameter dicts);
* ``update(grads, opt_state, params)`` returns new parameters and a new state of the same
  structure, never writing into its inputs;
* ``update_(grads, opt_state, params)`` runs the very same operations written into the given
  ``params`` and ``opt_state`` (which the caller donates), so it gives the same values to the last
  bit without allocating a new state; only ``grads`` is left untouched. Being in place, it is not
  differentiable;
* ``hyperparams(opt_state)`` gives ``{"lr": 0-d tensor}``, the learning rate the last update used
  (before the first update, the one it will use), from the state alone.

The updates have no host synchronisation and no Python branch on a tensor value, so
``torch.compile(update, fullgraph=True)`` captures each as one graph, and they run under
``torch.func.vmap`` over stacked parameters, states and gradients (an ensemble): the list ops
fall back from ``torch._foreach_*`` to per-tensor ops there (see ``_ops``).

Every float hyperparameter (``lr``, ``weight_decay``, ``momentum``, ``betas``, ``eps``, ...) is a
number or a *schedule*: a callable of the update count ``count`` (a 0-d ``int64`` tensor, the
number of updates applied *before* this one, so 0 for the first) returning a number or a 0-d
tensor. This is ``LambdaLR``'s convention: ``torch.optim`` with the hyperparameter set to
``schedule(t)`` before its ``t``-th step (counting from 0) takes the same steps. Note that
``0.9 ** count`` is computed in the default dtype (usually float32); write ``0.9 **
count.double()`` for a float64 schedule. Values used only at ``init`` (Adagrad's
``initial_accumulator_value``) and structural options (``nesterov``, ``amsgrad``, ...) are not
schedules. A hyperparameter given as a schedule keeps the terms it controls even where its value
is 0 (a number 0 skips them, as torch.optim does).

Weight decay takes a ``mask``: a dict ``{name: bool}`` naming every parameter, or a callable
``(name, param) -> bool``; ``adamw(1e-3, weight_decay=0.1, mask=lambda name, p: p.dim() >= 2)``
is nanoGPT's recipe. :func:`masked` updates only some parameters; :func:`partition` gives each
group its own optimizer, like torch.optim's parameter groups. :func:`from_torch` wraps a
``torch.optim`` class as a pure optimizer (eager only).

``update`` is differentiable in the ``torch.autograd`` sense. Pass parameters that do not require
grad (or call it under ``torch.no_grad()``) unless you mean to differentiate through the step.
"""

from __future__ import annotations

from ._adafactor import AdafactorState, adafactor
from ._adagrad import AdagradState, adagrad
from ._adam import (
    AdamaxState,
    AdamState,
    AmsgradState,
    NadamState,
    adam,
    adamax,
    adamw,
    nadam,
    radam,
)
from ._combine import MaskedState, masked, partition
from ._from_torch import TorchOptimState, from_torch
from ._lion import LionState, lion
from ._rmsprop import RmspropState, rmsprop
from ._sgd import SgdState, sgd

__all__ = [
    "AdafactorState",
    "AdagradState",
    "AdamState",
    "AdamaxState",
    "AmsgradState",
    "LionState",
    "MaskedState",
    "NadamState",
    "RmspropState",
    "SgdState",
    "TorchOptimState",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "from_torch",
    "lion",
    "masked",
    "nadam",
    "partition",
    "radam",
    "rmsprop",
    "sgd",
]
