"""The public API is pinned: adding or removing a name is a deliberate change to this file.

The docstring examples of the core modules run here too, so a plain ``pytest tests`` checks
them (``--doctest-modules`` also collects them when ``looplib/`` is passed to pytest).
"""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest

import looplib as ll

PUBLIC = [
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

CORE_MODULES = [
    "looplib",
    "looplib._accumulate",
    "looplib._clip",
    "looplib._fold",
    "looplib._step",
    "looplib._tbptt",
    "looplib._track",
    "looplib._transform",
    "looplib._tree",
    "looplib._types",
    "looplib._validate",
    "looplib.schedules",
    "looplib._vmap",
    "looplib._random",
]


def test_all_is_pinned() -> None:
    assert ll.__all__ == PUBLIC


def test_every_public_name_exists_and_nothing_private_is_exported() -> None:
    for name in ll.__all__:
        assert hasattr(ll, name), name
        assert not name.startswith("_") or name == "__version__", name
    assert len(set(ll.__all__)) == len(ll.__all__)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict = {}
    exec("from looplib import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(PUBLIC)


def test_version() -> None:
    assert ll.__version__ == "0.1.0"


def test_the_package_metadata_takes_its_version_from_the_module() -> None:
    # pyproject.toml declares the version dynamic, read from looplib.__version__: one source.
    import importlib.metadata
    import sys
    from pathlib import Path

    if sys.version_info >= (3, 11):
        import tomllib

        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text("utf-8")
        project = tomllib.loads(text)
        assert "version" not in project["project"]
        assert project["project"]["dynamic"] == ["version"]
        assert project["tool"]["setuptools"]["dynamic"]["version"] == {
            "attr": "looplib.__version__"
        }
    try:
        installed = importlib.metadata.version("looplib")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("looplib is not installed (only imported from the checkout)")
    assert installed == ll.__version__


@pytest.mark.parametrize(
    "name",
    [
        "accumulate",
        "chain",
        "clip",
        "clip_by_global_norm",
        "fold",
        "init",
        "sample_count",
        "scan",
        "split_time",
        "tbptt_split",
        "track_norm",
        "train_step",
    ],
)
def test_core_functions_are_documented(name: str) -> None:
    doc = inspect.getdoc(getattr(ll, name))
    assert doc and len(doc.splitlines()) >= 3, f"{name} needs a docstring with its semantics"


@pytest.mark.parametrize("module", CORE_MODULES)
def test_doctests_of_the_core_modules_pass(module: str) -> None:
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {module}"


OPTIM_PUBLIC = [
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


def test_optim_all_is_pinned() -> None:
    assert ll.optim.__all__ == OPTIM_PUBLIC
    namespace: dict = {}
    exec("from looplib.optim import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(OPTIM_PUBLIC)


def test_optim_state_classes_keep_their_checkpoint_names() -> None:
    # Checkpoints written before optim became a package name the states this way.
    from looplib._checkpoint import _NAMES

    assert _NAMES[ll.optim.SgdState] == "looplib.optim.SgdState"
    assert _NAMES[ll.optim.AdamState] == "looplib.optim.AdamState"
