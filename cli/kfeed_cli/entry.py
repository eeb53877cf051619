"""The `kfeed` console script's entry point: a Ctrl-C is one line and exit status 130 from the
first moment kfeed's code runs.

Python runs this module before kfeed's (heavy) modules load, and it imports nothing new: ``sys``
and ``_signal`` (the built-in that ``signal`` wraps) are loaded at start-up, while ``signal``
itself would first import ``enum`` and ``functools``, milliseconds in which a Ctrl-C would be a
traceback. Until ``kfeed_cli.main`` takes over, a Ctrl-C ends start-up at once. Earlier than this
module, a Ctrl-C is Python's: it kills the process by SIGINT (a shell reports that as 130 too) or
fails Python's own ``site`` import.
"""

import _signal  # type: ignore[import-not-found]  # no stub: the built-in behind `signal`
import sys


def _program() -> str:
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "")
    return f"kfeed {command}".rstrip()


def _interrupted_while_starting(_signum: int, _frame: object) -> None:
    print(f"{_program()}: interrupted", file=sys.stderr)
    raise SystemExit(130)


_signal.signal(_signal.SIGINT, _interrupted_while_starting)


def main() -> None:
    """``kfeed_cli.main.main``, which makes a Ctrl-C a KeyboardInterrupt again once its own
    handler is in place."""
    from kfeed_cli.main import main as run_kfeed

    run_kfeed()
