"""``from_torch``: any (supported) ``torch.optim`` class as a pure looplib optimizer."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .. import _ops as ops
from .. import _validate
from .._checkpoint import register_checkpoint_type
from .._types import Optimizer, Params, Tensor
from . import _checks


class TorchOptimState(NamedTuple):
    """The state of :func:`from_torch`.

    Attributes:
        count: number of updates applied so far, a 0-d ``int64`` tensor.
        state: per parameter name, the torch optimizer's per-parameter state (``step``
            included), e.g. ``{"w": {"step": ..., "exp_avg": ..., "exp_avg_sq": ...}}``. Before
            the first update the tensors are zeros of the right shapes (placeholders: torch
            creates its state lazily at the first ``step()``, and this structure never changes).
    """

    count: Tensor  # type: ignore[assignment]
    state: dict[str, dict[str, Tensor]]


register_checkpoint_type(TorchOptimState, name="looplib.optim.TorchOptimState")

# Classes that cannot work, and why (the message names the alternative).
_UNSUPPORTED: dict[str, str] = {
    "LBFGS": "it needs a closure that re-evaluates the loss several times per step, and a pure "
    "update receives one gradient",
    "SparseAdam": "it needs sparse gradients, and looplib's gradients are dense (use "
    "ll.optim.adam)",
}

_VMAP = (
    "{func}: a torch.optim class cannot run under torch.func.vmap (its step reads tensors on the "
    "host and its foreach ops have no batching rule); use looplib's own optimizers "
    "(ll.optim.adam, ...) for an ensemble."
)


def from_torch(cls: type, **hyperparameters: Any) -> Optimizer:
    """A pure optimizer that takes exactly ``cls``'s steps (``torch.optim.X``, bit for bit).

    Each update builds ``cls(fresh clones of params, **hyperparameters)``, gives the clones the
    gradients (cloned), loads the per-parameter state (cloned) unless it is the first update,
    calls ``step()``, and reads the parameters and state back. The inputs are never touched.
    ``update_`` copies the results into the donated ``params`` and state.

    What it cannot do:

    * ``LBFGS`` (needs a closure re-evaluating the loss) and ``SparseAdam`` (needs sparse
      gradients) are refused at construction.
    * It runs eagerly: torch.optim reads some state on the host (``step.item()``) and builds
      Python objects each call. ``update`` is wrapped in ``torch.compiler.disable``, so a compiled
      step runs it outside the graph; ``torch.compile(..., fullgraph=True)`` refuses it.
    * ``torch.func.vmap`` is refused with a clear error (use the native optimizers).
    * The hyperparameters are fixed numbers (no schedules); ``hyperparams`` reports the group's
      ``lr`` as a 0-d float32 tensor (``{}`` for a class without ``lr``).
    * Every update reconstructs the optimizer, which costs host time: this is a reference and an
      escape hatch, not the fast path.

    Args:
        cls: a ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.ASGD``.
        **hyperparameters: its keyword arguments (``lr=...``, ``foreach=...``, ...), checked at
            construction by building one instance.

    Returns:
        An ``Optimizer`` whose state is a :class:`TorchOptimState`.

    Example:
        >>> import torch
        >>> opt = from_torch(torch.optim.SGD, lr=0.1, momentum=0.9)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.update({"w": torch.tensor([1.0, -1.0])}, state, params)
        >>> params["w"], sorted(state.state["w"])
        (tensor([0.9000, 2.1000]), ['momentum_buffer'])
    """
    func = "from_torch"
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        _validate.fail(
            func,
            "cls",
            "must be a torch.optim.Optimizer subclass such as torch.optim.Adam",
            cls,
            exc=TypeError,
        )
    label = f"{func}({cls.__name__})"
    for name, why in _UNSUPPORTED.items():
        if issubclass(cls, getattr(torch.optim, name)):
            _validate.fail(
                func,
                "cls",
                "must be a torch.optim class that can run as a pure update",
                cls,
                f"torch.optim.{name} cannot: {why}.",
            )
    if "params" in hyperparameters:
        _validate.fail(
            func, "params", _checks.PARAMS_RULE, hyperparameters["params"], exc=TypeError
        )
    try:
        probe = cls([torch.zeros(2, 2, requires_grad=True)], **hyperparameters)
    except (TypeError, ValueError) as e:
        _validate.fail(
            func,
            "hyperparameters",
            f"must be accepted by torch.optim.{cls.__name__}",
            hyperparameters,
            f"It raised {type(e).__name__}: {e}",
            exc=type(e),
        )
    lr = probe.param_groups[0].get("lr")
    del probe

    def run(grads: Params, opt_state: TorchOptimState, params: Params) -> tuple[Params, Any]:
        _checks.keys(func, grads, params)
        if ops.is_batched(*params.values()) or ops.is_batched(*grads.values()):
            raise RuntimeError(_VMAP.format(func=label))
        if not params:  # torch.optim refuses an empty parameter list
            return {}, TorchOptimState(opt_state.count + 1, {})
        leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
        opt = cls(list(leaves.values()), **hyperparameters)
        first = bool(opt_state.count == 0)  # host read: torch.optim reads its step anyway
        for k, leaf in leaves.items():
            leaf.grad = grads[k].detach().clone()
            if not first:
                opt.state[leaf] = {n: v.clone() for n, v in opt_state.state[k].items()}
        opt.step()
        state = {}
        for k, leaf in leaves.items():
            got = opt.state.get(leaf, {})
            want = opt_state.state[k]
            if set(got) != set(want) or not all(isinstance(v, Tensor) for v in got.values()):
                raise RuntimeError(
                    f"{label}: the per-parameter state of {k!r} changed structure from "
                    f"{sorted(want)} to {sorted(got)}; this class cannot be used as a pure "
                    "optimizer."
                )
            state[k] = {n: got[n] for n in want}
        new_params = {k: leaf.detach() for k, leaf in leaves.items()}
        return new_params, TorchOptimState(opt_state.count + 1, state)

    def init(params: Params) -> TorchOptimState:
        count = torch.zeros((), dtype=torch.int64, device=_device(params))
        # Torch creates its state at the first step(): take one on clones with zero gradients
        # to learn the structure, and keep zeros of those shapes as placeholders.
        taken = _first_state(params, {k: torch.zeros_like(p) for k, p in params.items()})
        state = {k: {n: torch.zeros_like(v) for n, v in per.items()} for k, per in taken.items()}
        return TorchOptimState(count, state)

    def _first_state(params: Params, grads: Params) -> dict[str, dict[str, Tensor]]:
        if not params:
            return {}
        leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
        opt = cls(list(leaves.values()), **hyperparameters)
        for k, leaf in leaves.items():
            leaf.grad = grads[k]
        opt.step()
        out: dict[str, dict[str, Tensor]] = {}
        for k, leaf in leaves.items():
            per = opt.state.get(leaf, {})
            bad = [n for n, v in per.items() if not isinstance(v, Tensor)]
            if bad:
                raise TypeError(
                    f"{label}: torch.optim.{cls.__name__} keeps non-tensor state {bad} for "
                    f"{k!r}; a looplib state holds tensors only."
                )
            out[k] = dict(per)
        return out

    @torch.compiler.disable
    def update(grads: Params, opt_state: TorchOptimState, params: Params) -> tuple[Params, Any]:
        with torch.no_grad():
            return run(grads, opt_state, params)

    @torch.compiler.disable
    def update_(grads: Params, opt_state: TorchOptimState, params: Params) -> tuple[Params, Any]:
        with torch.no_grad():
            new_params, new_state = run(grads, opt_state, params)
            for k, p in params.items():
                p.copy_(new_params[k])
                for n, v in opt_state.state[k].items():
                    v.copy_(new_state.state[k][n])
            opt_state.count.add_(1)
        return params, opt_state

    def hyperparams(opt_state: TorchOptimState) -> dict[str, Tensor]:
        if lr is None:
            return {}
        value = lr.detach().clone() if isinstance(lr, Tensor) else float(lr)
        return {"lr": torch.as_tensor(value, dtype=torch.float32, device=opt_state.count.device)}

    return Optimizer(init, update, update_, hyperparams)


def _device(params: Params) -> torch.device:
    return next(iter(params.values())).device if params else torch.device("cpu")
