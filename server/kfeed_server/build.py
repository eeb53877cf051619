"""Which code is running: the package version and, when known, the exact commit."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from kfeed_server import __version__

COMMIT_VARIABLE = "KFEED_COMMIT"
"""Set by builds that know their commit (container images, CI) when no git checkout is around."""


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def code_version() -> str:
    """``__version__+g<commit>`` (PEP 440 local version): the commit from ``KFEED_COMMIT``, else
    from the git checkout the code runs from, with ``.dirty`` when it has uncommitted changes;
    the bare version when neither is known."""
    commit = os.environ.get(COMMIT_VARIABLE, "").strip()
    dirty = False
    if not commit:
        commit = _git("rev-parse", "HEAD") or ""
        dirty = bool(commit) and bool(_git("status", "--porcelain", "--untracked-files=no"))
    if not commit:
        return __version__
    local = f"g{commit[:12]}" + (".dirty" if dirty else "")
    separator = "." if "+" in __version__ else "+"
    return f"{__version__}{separator}{local}"
