"""looplib: a pure, composable training loop for PyTorch.

Training is a fold over batches. Each step is a pure function ``(state, batch) -> state``, built
by composing transformers, and the whole training state is one pytree.

>>> import looplib as ll
>>> sorted(ll.TrainState._fields)
['buffers', 'metrics', 'opt_state', 'params', 'slots', 'step']
"""

from . import loggers, optim, schedules
from ._accumulate import AccumulateState, accumulate
from ._checkpoint import export, load, load_with_extra, register_checkpoint_type, save
from ._clip import clip, clip_by_global_norm
from ._clip_value import clip_value
from ._compile import CompiledStep, CompileError, compile
from ._data import batches_used
from ._distributed import (
    agree,
    all_reduce_metrics,
    broadcast_state,
    check_same_state,
    is_main_process,
    pmean,
    shard,
    world,
)
from ._ema import ema, ema_params, with_ema_params
from ._epoch import epoch
from ._fit import FitResult, evaluate, fit
from ._fold import fold, scan
from ._guard import NonFiniteLossError
from ._loss_scale import loss_scale
from ._resume import CheckpointError, Checkpoints
from ._rotate import best_checkpoint, latest_checkpoint, save_rotating
from ._skip import NonFiniteGradientError, SkipState, skip_nonfinite
from ._step import LossOutput, Step, donate, init, sample_count, train_step
from ._stopping import all_of, any_of, early_stopping, never, stop_reason
from ._tbptt import split_time, tbptt_split
from ._track import track_norm
from ._transform import Transformer, chain
from ._types import Optimizer, TrainState
from ._vmap import stack, unstack, vmap

__version__ = "0.1.0"

__all__ = [
    "AccumulateState",
    "CheckpointError",
    "Checkpoints",
    "CompileError",
    "CompiledStep",
    "FitResult",
    "LossOutput",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "Optimizer",
    "SkipState",
    "Step",
    "TrainState",
    "Transformer",
    "accumulate",
    "agree",
    "all_of",
    "all_reduce_metrics",
    "any_of",
    "batches_used",
    "best_checkpoint",
    "broadcast_state",
    "chain",
    "check_same_state",
    "clip",
    "clip_by_global_norm",
    "clip_value",
    "compile",
    "donate",
    "early_stopping",
    "ema",
    "ema_params",
    "epoch",
    "evaluate",
    "export",
    "fit",
    "fold",
    "init",
    "is_main_process",
    "latest_checkpoint",
    "load",
    "load_with_extra",
    "loggers",
    "loss_scale",
    "never",
    "optim",
    "pmean",
    "register_checkpoint_type",
    "sample_count",
    "save",
    "save_rotating",
    "scan",
    "schedules",
    "shard",
    "skip_nonfinite",
    "split_time",
    "stack",
    "stop_reason",
    "tbptt_split",
    "track_norm",
    "train_step",
    "unstack",
    "vmap",
    "with_ema_params",
    "world",
    "__version__",
]
