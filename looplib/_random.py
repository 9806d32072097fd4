"""Random numbers keyed by the state: the same state and batch always draw the same numbers.

The state carries a key, ``state.slots["rng"]``: a 1-d ``int64`` tensor ``[seed, counter]``.
While the loss runs, :class:`keyed` (a ``TorchFunctionMode``) answers torch's random functions
(``F.dropout`` and its relatives, ``torch.rand``/``randn``/``randint``/``bernoulli``/``normal``,
``Tensor.uniform_``/``normal_``/``bernoulli_``/``exponential_``, ``randperm``, ``multinomial``,
``F.rrelu`` and ``F.scaled_dot_product_attention`` with ``dropout_p > 0``) from the key instead of
torch's global generator. The numbers are a counter-based hash of ``(seed, counter, n, i)``, for
the ``n``-th random call of the micro-batch and element ``i``::

    bits(i) = h(h(h(i ^ a(n)) ^ b) ^ c)       # h: a 32-bit integer hash, a, b, c: from the key

It is plain tensor arithmetic, so the very same numbers come out eagerly, under
``torch.compile``, in a CUDA graph and under ``torch.func.vmap`` (where each member of an
ensemble has its own key). The step advances the counter once per micro-batch.

A function given its own ``generator=`` keeps it. Random functions without a keyed version here
(``torch.poisson``, ``Tensor.geometric_``, ``cauchy_``, ``log_normal_``, ``random_``) raise,
rather than silently draw from the global generator; randomness inside fused kernels (the
dropout between the layers of ``nn.LSTM(num_layers > 1, dropout > 0)``) cannot be seen and still
uses the global generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._types import Tensor

SLOT = "rng"
_M = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def new_key(seed: int | None, device: torch.device) -> Tensor:
    """A fresh key ``[seed, 0]``; without a seed, one is drawn from torch's global generator."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if device not in _ONES:
        _ONES[device] = torch.tensor([0, 1], dtype=torch.int64, device=device)
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


def advance(key: Tensor) -> Tensor:
    """The key of the next micro-batch: the counter plus one."""
    one = _ONES.get(key.device)
    if one is None:  # not prepared for this device: build it (one more small kernel)
        one = torch.arange(2, dtype=key.dtype, device=key.device)
    return key + one


_ONES: dict[torch.device, Tensor] = {}
"""``[0, 1]`` per device, made by :func:`new_key` (outside any compiled code, so a compiled
step only reads this table); nothing ever writes into these tensors."""


def _h(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply, after Wellons' lowbias32) on ``int64`` tensors
    holding values in ``[0, 2**32)``. Both multipliers are below ``2**31``, so every product
    stays below ``2**63``: exact, with no reliance on integer overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M
    return x ^ (x >> 16)


class _Material:
    """The three 32-bit words ``a0, b, c`` derived from a key (0-d tensors)."""

    def __init__(self, key: Tensor) -> None:
        # Python-int constants only: no tensor is copied from the host.
        seed, counter = key[..., 0], key[..., 1]
        w0 = _h((seed & _M) ^ _h(((seed >> 32) & _M) ^ 0x2545F491))
        w1 = _h((counter & _M) ^ _h(((counter >> 32) & _M) ^ 0x6A09E667))
        self.a0 = _h(w0 ^ _h(w1))
        self.b = _h(self.a0 ^ w1 ^ 0x3C6EF372)
        self.c = _h(self.b ^ w0 ^ 0x510E527F)


class keyed(TorchFunctionMode):
    """Answer torch's random functions from ``key`` while the block runs (see the module).

    ``draws`` counts the random calls answered, so a caller can learn whether a loss is random.
    """

    def __init__(self, key: Tensor) -> None:
        super().__init__()
        self.key = key
        self.draws = 0
        self._material: _Material | None = None

    # -- raw numbers -----------------------------------------------------------------------
    def bits(
        self, shape: torch.Size | tuple[int, ...], device: torch.device, stream: int = 0
    ) -> Tensor:
        """Uniform 32-bit values (as ``int64``) of ``shape``, for this call's ``stream``."""
        if self._material is None:
            self._material = _Material(self.key)
        m = self._material
        n = self.draws * 4 + stream
        a = m.a0 ^ ((n * _GOLDEN + 0x7F4A7C15) & _M)
        numel = math.prod(shape)
        index = torch.arange(numel, dtype=torch.int64, device=device).reshape(shape) & _M
        return _h(_h(_h(index ^ a) ^ m.b) ^ m.c)

    def uniform(self, shape: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Uniform numbers in ``[0, 1)``: 24 random bits for float32 and narrower, 52 for float64."""
        if dtype == torch.float64:
            hi = self.bits(shape, device, 0) >> 6
            lo = self.bits(shape, device, 1) >> 6
            return (hi * 67108864 + lo).to(torch.float64) * 2.0**-52
        return ((self.bits(shape, device, 0) >> 8).to(torch.float32) * 2.0**-24).to(dtype)

    def normal(self, shape: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Standard normal numbers (Box-Muller on two uniform streams)."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        if work == torch.float64:
            u1 = self.uniform(shape, work, device)
            u2 = (self.bits(shape, device, 2) >> 11).to(work) * 2.0**-21
        else:
            u1 = ((self.bits(shape, device, 0) >> 8).to(work)) * 2.0**-24
            u2 = ((self.bits(shape, device, 2) >> 8).to(work)) * 2.0**-24
        radius = torch.sqrt(-2.0 * torch.log1p(-u1))
        return (radius * torch.cos((2.0 * math.pi) * u2)).to(dtype)

    def keep(self, shape: Any, p: float, device: torch.device) -> Tensor:
        """A boolean mask, true with probability ``1 - p`` (an exact integer threshold)."""
        threshold = round(float(p) * 2**24)
        return (self.bits(shape, device, 0) >> 8) >= threshold

    # -- the mode ------------------------------------------------------------------------------
    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        impl = _IMPLS.get(func)
        if impl is None or kwargs.get("generator") is not None:
            return func(*args, **kwargs)
        out = impl(self, *args, **kwargs)
        if out is NotImplemented:
            return func(*args, **kwargs)
        return out

    def next_call(self) -> None:
        self.draws += 1


# ---------------------------------------------------------------------------------------------
# Keyed versions of torch's random functions. Each returns NotImplemented when it draws nothing
# (dropout with p == 0 or in eval mode), so the original runs.


CHECKPOINTED = (
    "{name}: a random draw inside an activation-checkpointed block "
    "(torch.utils.checkpoint). The backward pass recomputes the block, and looplib's keyed "
    "random numbers cannot be replayed there, so the recomputed mask would differ from the "
    "forward one. Move the random operation (dropout) out of the checkpointed function."
)


@torch._dynamo.assume_constant_result  # a fact of the trace: the compiler bakes it in
def _in_checkpoint() -> bool:
    """Whether a non-reentrant ``torch.utils.checkpoint`` block is being recorded now."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    return bool(hooks) and "_checkpoint_hook" in getattr(hooks[0], "__qualname__", "")


def _draw(mode: keyed, fn: Callable[[], Tensor]) -> Tensor:
    if _in_checkpoint():
        raise NotImplementedError(CHECKPOINTED.format(name="looplib"))
    try:
        return fn()
    finally:
        mode.next_call()


def _dropout(
    mode: keyed, input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> Any:
    if not training or p == 0:
        return NotImplemented
    if p == 1:
        out = input * 0
    else:
        keep = _draw(mode, lambda: mode.keep(input.shape, p, input.device))
        out = input * keep.to(input.dtype) * (1.0 / (1.0 - p))
    return input.copy_(out) if inplace else out


def _torch_dropout(mode: keyed, input: Tensor, p: float, train: bool) -> Any:
    return _dropout(mode, input, p, train)


def _channel_shape(input: Tensor, spatial: int) -> tuple[int, ...]:
    """The mask shape of channel dropout: one draw per (sample, channel)."""
    lead = input.dim() - spatial
    return tuple(input.shape[:lead]) + (1,) * spatial


def _channels(spatial: int) -> Callable[..., Any]:
    def impl(
        mode: keyed, input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
    ) -> Any:
        if not training or p == 0:
            return NotImplemented
        shape = _channel_shape(input, spatial if spatial else max(input.dim() - 2, 0))
        keep = _draw(mode, lambda: mode.keep(shape, p, input.device))
        out = input * keep.to(input.dtype) * (1.0 / (1.0 - p)) if p < 1 else input * 0
        return input.copy_(out) if inplace else out

    return impl


_SELU_ALPHA = 1.7580993408473766  # torch's alpha dropout constant: -SELU's alpha times its scale


def _alpha(feature: bool) -> Callable[..., Any]:
    def impl(
        mode: keyed, input: Tensor, p: float = 0.5, training: bool = False, inplace: bool = False
    ) -> Any:
        if not training or p == 0:
            return NotImplemented
        if p == 1:
            out = input * 0
        else:
            shape = _channel_shape(input, max(input.dim() - 2, 0)) if feature else input.shape
            keep = _draw(mode, lambda: mode.keep(shape, p, input.device)).to(input.dtype)
            a = 1.0 / math.sqrt((_SELU_ALPHA**2 * p + 1) * (1 - p))
            b = (keep - 1) * (_SELU_ALPHA * a) + _SELU_ALPHA * a * p
            out = input * (keep * a) + b
        return input.copy_(out) if inplace else out

    return impl


def _size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
    if "size" in kwargs:
        size = kwargs.pop("size")
    elif len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        size = args[0]
    else:
        size = args
    return tuple(int(s) for s in size)


def _factory(
    kwargs: dict[str, Any], default: torch.dtype | None = None
) -> tuple[torch.dtype, torch.device]:
    dtype = kwargs.get("dtype") or default or torch.get_default_dtype()
    device = (
        torch.device(kwargs["device"]) if kwargs.get("device") is not None else torch.device("cpu")
    )
    return dtype, device


def _finish(out: Tensor, kwargs: dict[str, Any]) -> Tensor:
    if kwargs.get("requires_grad"):
        out.requires_grad_(True)
    if kwargs.get("out") is not None:
        return kwargs["out"].copy_(out)
    return out


def _rand(mode: keyed, *args: Any, **kwargs: Any) -> Tensor:
    shape = _size(args, kwargs)
    dtype, device = _factory(kwargs)
    return _finish(_draw(mode, lambda: mode.uniform(shape, dtype, device)), kwargs)


def _randn(mode: keyed, *args: Any, **kwargs: Any) -> Tensor:
    shape = _size(args, kwargs)
    dtype, device = _factory(kwargs)
    return _finish(_draw(mode, lambda: mode.normal(shape, dtype, device)), kwargs)


def _like(input: Tensor, kwargs: dict[str, Any]) -> tuple[torch.dtype, torch.device]:
    return kwargs.get("dtype") or input.dtype, torch.device(kwargs.get("device") or input.device)


def _rand_like(mode: keyed, input: Tensor, **kwargs: Any) -> Tensor:
    dtype, device = _like(input, kwargs)
    return _finish(_draw(mode, lambda: mode.uniform(input.shape, dtype, device)), kwargs)


def _randn_like(mode: keyed, input: Tensor, **kwargs: Any) -> Tensor:
    dtype, device = _like(input, kwargs)
    return _finish(_draw(mode, lambda: mode.normal(input.shape, dtype, device)), kwargs)


def _integers(
    mode: keyed, low: int, high: int, shape: Any, dtype: torch.dtype, device: torch.device
) -> Tensor:
    span = int(high) - int(low)
    if span <= 0:
        raise ValueError(
            f"random_: expects 'from' to be less than 'to', but got from={low} >= to={high}"
        )

    def draw() -> Tensor:
        if span <= 2**24:
            u = mode.bits(shape, device, 0) >> 8
            values = (u * span) >> 24
        else:
            wide = (mode.bits(shape, device, 0) << 31) | (mode.bits(shape, device, 1) >> 1)
            values = torch.remainder(wide, span)
        return (values + int(low)).to(dtype)

    return _draw(mode, draw)


def _randint(mode: keyed, *args: Any, **kwargs: Any) -> Tensor:
    size = kwargs.pop("size", None)
    numbers = list(args)
    if size is None:
        size = numbers.pop()
    low, high = (0, numbers[0]) if len(numbers) == 1 else (numbers[0], numbers[1])
    low, high = kwargs.pop("low", low), kwargs.pop("high", high)
    dtype, device = _factory(kwargs, torch.int64)
    return _finish(_integers(mode, low, high, tuple(size), dtype, device), kwargs)


def _randint_like(mode: keyed, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    numbers = list(args)
    low, high = (0, numbers[0]) if len(numbers) == 1 else (numbers[0], numbers[1])
    low, high = kwargs.pop("low", low), kwargs.pop("high", high)
    dtype, device = _like(input, kwargs)
    return _finish(_integers(mode, low, high, input.shape, dtype, device), kwargs)


def _bernoulli(mode: keyed, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    p = kwargs.get("p", args[0] if args else None)
    probs = input if p is None else torch.full_like(input, float(p))
    u = _draw(
        mode,
        lambda: mode.uniform(
            input.shape,
            torch.float64 if input.dtype == torch.float64 else torch.float32,
            input.device,
        ),
    )
    return _finish((u < probs).to(input.dtype), kwargs)


def _bernoulli_(mode: keyed, self: Tensor, p: Any = 0.5, **kwargs: Any) -> Tensor:
    probs = p if isinstance(p, torch.Tensor) else torch.full_like(self, float(p))
    u = _draw(
        mode,
        lambda: mode.uniform(
            self.shape, torch.float64 if self.dtype == torch.float64 else torch.float32, self.device
        ),
    )
    return self.copy_((u < probs).to(self.dtype))


def _uniform_(mode: keyed, self: Tensor, a: float = 0.0, b: float = 1.0, **kwargs: Any) -> Tensor:
    a, b = kwargs.get("from", a), kwargs.get("to", b)
    u = _draw(mode, lambda: mode.uniform(self.shape, self.dtype, self.device))
    return self.copy_(u * (b - a) + a)


def _normal_(
    mode: keyed, self: Tensor, mean: float = 0.0, std: float = 1.0, **kwargs: Any
) -> Tensor:
    z = _draw(mode, lambda: mode.normal(self.shape, self.dtype, self.device))
    return self.copy_(z * std + mean)


def _exponential_(mode: keyed, self: Tensor, lambd: float = 1.0, **kwargs: Any) -> Tensor:
    u = _draw(
        mode,
        lambda: mode.uniform(
            self.shape, torch.float64 if self.dtype == torch.float64 else torch.float32, self.device
        ),
    )
    return self.copy_((-torch.log1p(-u) / lambd).to(self.dtype))


def _normal(mode: keyed, mean: Any, std: Any = 1.0, *args: Any, **kwargs: Any) -> Tensor:
    size = kwargs.pop("size", args[0] if args else None)
    if isinstance(mean, torch.Tensor) or isinstance(std, torch.Tensor):
        ref = mean if isinstance(mean, torch.Tensor) else std
        shape = torch.broadcast_shapes(
            ref.shape, std.shape if isinstance(std, torch.Tensor) else ()
        )
        z = _draw(mode, lambda: mode.normal(shape, ref.dtype, ref.device))
        return _finish(z * std + mean, kwargs)
    dtype, device = _factory(kwargs)
    z = _draw(mode, lambda: mode.normal(tuple(size), dtype, device))
    return _finish(z * std + mean, kwargs)


def _randperm(mode: keyed, n: int, **kwargs: Any) -> Tensor:
    dtype, device = _factory(kwargs, torch.int64)
    keys = _draw(mode, lambda: mode.uniform((int(n),), torch.float64, device))
    return _finish(torch.argsort(keys).to(dtype), kwargs)


def _multinomial(
    mode: keyed, input: Tensor, num_samples: int, replacement: bool = False, **kwargs: Any
) -> Tensor:
    probs = input / input.sum(-1, keepdim=True)
    if replacement:
        shape = (*input.shape[:-1], int(num_samples))
        u = _draw(mode, lambda: mode.uniform(shape, torch.float64, input.device))
        cdf = torch.cumsum(probs.to(torch.float64), -1)
        cdf = cdf / cdf[..., -1:]
        out = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True)
        return _finish(out.clamp(max=input.shape[-1] - 1), kwargs)
    # Without replacement: the top k of log(p) + Gumbel noise (the Gumbel-top-k trick).
    u = _draw(mode, lambda: mode.uniform(input.shape, torch.float64, input.device))
    gumbel = -torch.log(-torch.log1p(-u).clamp(max=-1e-300))
    scores = torch.log(probs.to(torch.float64)) + gumbel
    return _finish(torch.topk(scores, int(num_samples), dim=-1).indices, kwargs)


def _rrelu(
    mode: keyed,
    input: Tensor,
    lower: float = 1.0 / 8,
    upper: float = 1.0 / 3,
    training: bool = False,
    inplace: bool = False,
) -> Any:
    if not training:
        return NotImplemented
    u = _draw(mode, lambda: mode.uniform(input.shape, input.dtype, input.device))
    slope = u * (upper - lower) + lower
    out = torch.where(input >= 0, input, input * slope)
    return input.copy_(out) if inplace else out


def _sdpa(
    mode: keyed,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Any:
    """Attention with keyed dropout on the weights: the math form of
    ``F.scaled_dot_product_attention`` (used only when ``dropout_p > 0``)."""
    if dropout_p == 0:
        return NotImplemented
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    length, source = query.shape[-2], key.shape[-2]
    if is_causal:
        allowed = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    keep = _draw(mode, lambda: mode.keep(weights.shape, dropout_p, weights.device))
    weights = weights * keep.to(weights.dtype) * (1.0 / (1.0 - dropout_p))
    return weights @ value


def _unsupported(name: str) -> Callable[..., Any]:
    def impl(mode: keyed, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{name}: looplib draws a step's random numbers from the key in the state "
            f"(state.slots['rng']), and {name} has no keyed version. Pass it a generator of your "
            "own (generator=...), or draw with torch.rand / torch.randn and transform."
        )

    return impl


_IMPLS: dict[Any, Callable[..., Any]] = {
    F.dropout: _dropout,
    torch.dropout: _torch_dropout,
    torch.nn.functional.dropout1d: _channels(1),
    torch.nn.functional.dropout2d: _channels(2),
    torch.nn.functional.dropout3d: _channels(3),
    torch.feature_dropout: lambda mode, input, p, train: _channels(0)(mode, input, p, train),
    F.alpha_dropout: _alpha(False),
    F.feature_alpha_dropout: _alpha(True),
    torch.alpha_dropout: lambda mode, input, p, train: _alpha(False)(mode, input, p, train),
    torch.feature_alpha_dropout: lambda mode, input, p, train: _alpha(True)(mode, input, p, train),
    torch.rand: _rand,
    torch.randn: _randn,
    torch.rand_like: _rand_like,
    torch.randn_like: _randn_like,
    torch.randint: _randint,
    torch.randint_like: _randint_like,
    torch.bernoulli: _bernoulli,
    torch.Tensor.bernoulli: _bernoulli,
    torch.Tensor.bernoulli_: _bernoulli_,
    torch.Tensor.uniform_: _uniform_,
    torch.Tensor.normal_: _normal_,
    torch.Tensor.exponential_: _exponential_,
    torch.normal: _normal,
    torch.randperm: _randperm,
    torch.multinomial: _multinomial,
    torch.Tensor.multinomial: _multinomial,
    F.rrelu: _rrelu,
    F.scaled_dot_product_attention: _sdpa,
    torch.poisson: _unsupported("torch.poisson"),
    torch.Tensor.geometric_: _unsupported("Tensor.geometric_"),
    torch.Tensor.cauchy_: _unsupported("Tensor.cauchy_"),
    torch.Tensor.log_normal_: _unsupported("Tensor.log_normal_"),
    torch.Tensor.random_: _unsupported("Tensor.random_"),
}
