"""How a long-running `kfeed` command stops: SIGTERM is an ordinary stop, Ctrl-C an interruption.

Both signals start the same graceful shutdown. Afterwards a stop by SIGTERM (a supervisor, the
demo stopping its children) exits 0, while Ctrl-C (SIGINT) ends the command the way ``kfeed``
reports every interruption: the line ``kfeed <command>: interrupted`` and exit status 130.
"""

from __future__ import annotations

import asyncio
import signal

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """SIGINT and SIGTERM handlers on the running loop that remember which signal came first."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        for signum in _STOP_SIGNALS:
            self._loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: signal.Signals) -> None:
        if self.received is None:
            self.received = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    def remove(self) -> None:
        """Give both signals back to their default handling."""
        for signum in _STOP_SIGNALS:
            self._loop.remove_signal_handler(signum)

    def raise_if_interrupted(self) -> None:
        """Call once stopped gracefully: after Ctrl-C the command ends as interrupted."""
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt
