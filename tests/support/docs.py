"""Reading the code blocks of the project's Markdown files, for the tests that run them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_MARKER = re.compile(r"<!--\s*([\w-]+)\s*-->\s*$")


class CodeBlock(NamedTuple):
    language: str
    code: str
    # The HTML comment on the line right before the fence (`<!-- offline-test -->`), if any.
    marker: str | None


def all_code_blocks(path: Path) -> list[CodeBlock]:
    """Every fenced block of ``path``, in order."""
    text = path.read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        blocks.append(CodeBlock(match[1], match[2], marker[1] if marker else None))
    return blocks


def code_blocks(path: Path, language: str) -> list[str]:
    """The code of ``path``'s blocks fenced as ``language``."""
    return [block.code for block in all_code_blocks(path) if block.language == language]
