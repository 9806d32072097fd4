"""One code path: no step code branches on the compiler or reads device values on the host.

The behavioural side of this promise (eager, compiled and vmapped runs agree; no CUDA sync
inside a step) is tested in test_compile.py, test_vmap.py and test_gpu.py; this file pins the
source-level rule, so a branch on ``torch.compiler.is_compiling()`` cannot creep back in.
"""

from __future__ import annotations

import re
from pathlib import Path

import looplib

SOURCES = sorted(Path(looplib.__file__).parent.rglob("*.py"))
# A call in code, not a mention in a docstring (those are quoted as ``...``).
BRANCH = re.compile(r"(?<!`)\b(?:torch\.compiler|torch\._dynamo)\.is_compiling\(\)")


def test_no_module_branches_on_the_compiler() -> None:
    offenders = [
        f"{path.name}:{number}"
        for path in SOURCES
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if BRANCH.search(line)
    ]
    assert not offenders, f"branches on is_compiling(): {offenders}"


def test_the_sources_were_found() -> None:
    names = {p.name for p in SOURCES}
    assert {"_step.py", "_accumulate.py", "_clip.py", "_skip.py", "_ops.py"} <= names
