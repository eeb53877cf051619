"""`kfeed serve --workers N`: N server processes on one port (docs/adr/0018-serve-workers.md).

The supervisor (the `kfeed serve` process) prepares the database once — migrations, the token
key, the previous run's unfinished backtests — then starts N workers. Each is a whole kfeed
server bound to the same port with SO_REUSEPORT, so the kernel spreads connections over them,
and each follows commit notices like any replica (docs/adr/0010): a Publish is served by
whichever worker took the ingest's connection, and every worker fans out to its own
subscribers what it learns from the commits. SIGTERM or SIGINT stop every worker gracefully; a
worker that dies stops the rest, and the command fails naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import signal
from multiprocessing.process import BaseProcess

from sqlalchemy.engine import make_url

from kfeed_server.app import ServerConfig, check_listen_beyond_loopback, prepare_database
from kfeed_server.backtest.loading import load_strategy_modules
from kfeed_server.logs import LogFormat, configure_logging
from kfeed_settings import CommandError
from kfeed_settings.stopping import StopSignals

log = logging.getLogger(__name__)

# How often the supervisor looks for a worker that ended on its own.
WATCH_INTERVAL_SECONDS = 0.5
# prctl(2): the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def check_workers(config: ServerConfig, workers: int) -> None:
    """One line (CommandError) for a configuration several workers cannot serve."""
    if workers < 1:
        raise CommandError("--workers must be at least 1")
    if workers == 1:
        return
    if make_url(config.database_url).get_backend_name() != "postgresql":
        raise CommandError(
            "--workers above 1 needs PostgreSQL: SQLite has one writing process and no commit"
            " notices to bring one worker's batches to the others' streams"
        )
    if config.listen.rsplit(":", 1)[-1] == "0":
        raise CommandError(
            "--workers above 1 needs a fixed port in --listen (every worker binds it)"
        )
    if config.metrics_listen or config.web is not None:
        raise CommandError(
            "--workers above 1 serves neither --metrics-listen nor --web-listen (each worker"
            " would need its own port); run those on a server with --workers 1"
        )


def _end_with_the_supervisor() -> None:
    """Linux: this process gets SIGTERM when the supervisor dies, even by SIGKILL (no orphan
    workers keep the port)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _serve_worker(config: ServerConfig, log_level: str, log_format: LogFormat, index: int) -> None:
    """A worker process: one kfeed server on the shared port until SIGTERM/SIGINT."""
    from kfeed_server.app import run_until_signalled

    _end_with_the_supervisor()
    configure_logging(log_level, log_format)
    load_strategy_modules(config.backtest.strategy_modules)
    log.info("worker %d starting", index)
    # Ctrl-C reaches the whole process group; the supervisor reports the interruption.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_until_signalled(config))


async def run_workers(
    config: ServerConfig, workers: int, log_level: str, log_format: LogFormat
) -> None:
    """Prepare the database, run ``workers`` server processes until SIGTERM/SIGINT or until
    one of them ends, then stop them all."""
    check_listen_beyond_loopback(config)
    await prepare_database(config)
    worker_config = config.model_copy(update={"migrate": False, "worker": True})
    context = multiprocessing.get_context("spawn")
    processes: list[BaseProcess] = [
        context.Process(
            target=_serve_worker,
            args=(worker_config, log_level, log_format, index),
            name=f"kfeed-serve-worker-{index}",
        )
        for index in range(workers)
    ]
    stop_requested = StopSignals()
    for process in processes:
        process.start()
    log.info("starting %d workers on %s", workers, config.listen)
    ended: BaseProcess | None = None
    while ended is None and not stop_requested.is_set():
        ended = next((p for p in processes if not p.is_alive()), None)
        if ended is None:
            await asyncio.sleep(WATCH_INTERVAL_SECONDS)
    await _stop(processes, config.grace_period)
    if ended is not None:
        raise CommandError(f"worker {processes.index(ended)} exited with status {ended.exitcode}")
    log.info("shutting down")
    stop_requested.raise_if_interrupted()


async def _stop(processes: list[BaseProcess], grace_period: float) -> None:
    """SIGTERM every worker still running; SIGKILL those not gone after the grace period."""
    for process in processes:
        if process.is_alive() and process.pid is not None:
            process.terminate()  # SIGTERM: the worker shuts down gracefully
    deadline = asyncio.get_running_loop().time() + grace_period + 10
    while any(p.is_alive() for p in processes):
        if asyncio.get_running_loop().time() > deadline:
            for process in processes:
                if process.is_alive() and process.pid is not None:
                    process.kill()
            break
        await asyncio.sleep(0.1)
    for process in processes:
        process.join()
