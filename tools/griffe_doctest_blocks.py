"""A griffe extension for the API reference: doctest examples render as code blocks.

The docstrings are Google style and give their examples as doctests (``>>>`` lines and their
output), some under an ``Example:`` heading and some in the running text. Markdown would read
them as text, and ``x[...][...]`` in them as reference links. This extension wraps every run of
doctest lines (from a ``>>>`` line to the next blank line) in a ``pycon`` code fence before the
docstring is parsed, and turns Sphinx roles (``:func:`fold```) into code spans. mkdocs.yml
loads it through mkdocstrings' ``extensions`` option.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|data|mod|attr|exc|obj):`~?([^`]+)`")


def fence_doctests(text: str) -> str:
    """``text`` with each doctest run fenced as ```` ```pycon ````, at the run's indentation."""
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(f"{indent}```")
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    """Fence the doctests of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = ROLE.sub(r"`\1`", obj.docstring.value)
            obj.docstring.value = fence_doctests(text) if ">>>" in text else text
