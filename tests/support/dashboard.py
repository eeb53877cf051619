"""The dashboard's live stack as real processes — the simulator (stepping every 0.5 s, with
WebSocket sequence gaps now and then) → `kfeed ingest` (WebSocket) → `kfeed serve --web-listen`
on SQLite — for the browser tests and bench/bench_dashboard.py, and Debian's Chromium."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_sim.signing import generate_key_pair
from tests.support.processes import (
    KEY_ID,
    KfeedProcess,
    free_port,
    start_kfeed,
    wait_for_http,
    wait_for_serving,
)
from tests.support.waiting import eventually

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str | None:
    """Debian's Chromium (`make browser` installs it), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Dashboard:
    """`kfeed serve` with its web listener (and whatever feeds it)."""

    url: str
    grpc_address: str
    processes: list[KfeedProcess]

    def logs(self) -> str:
        return "\n".join(f"--- {p.command}\n{p.log()}" for p in self.processes)


async def start_dashboard(
    log_dir: Path, database: Path, web_root: Path, *extra_serve_args: str
) -> tuple[str, str, KfeedProcess]:
    grpc_address = f"127.0.0.1:{free_port()}"
    web_port = free_port()
    serve = await start_kfeed("serve", [
        "--listen", grpc_address, "--database-url", f"sqlite+aiosqlite:///{database}",
        "--web-listen", f"127.0.0.1:{web_port}", "--web-root", str(web_root), *extra_serve_args,
    ], log_dir)  # fmt: skip
    await wait_for_serving(grpc_address, serve)
    url = f"http://127.0.0.1:{web_port}/"
    await wait_for_http(url, serve)
    return url, grpc_address, serve


async def wait_for_markets(grpc_address: str, ingest: KfeedProcess) -> None:
    """Until the ingest has stored markets and their snapshots."""
    async with grpc.aio.insecure_channel(grpc_address) as channel:
        stub = pb_grpc.MarketServiceStub(channel)

        async def stored() -> bool:
            ingest.assert_running()
            markets = (await stub.ListMarkets(pb.ListMarketsRequest())).markets
            if not markets:
                return False
            try:
                await stub.GetLatestSnapshot(pb.GetLatestSnapshotRequest(ticker=markets[0].ticker))
            except grpc.aio.AioRpcError:
                return False
            return True

        await eventually(stored, within=60, what="markets stored by the ingest")


@asynccontextmanager
async def live_dashboard(
    directory: Path, web_root: Path, *extra_serve_args: str
) -> AsyncIterator[Dashboard]:
    """The stack, its files in ``directory``, the dashboard served from ``web_root``; stopped
    on exit."""
    log_dir = directory / "logs"
    log_dir.mkdir()
    private_pem, public_pem = generate_key_pair()
    private_key, public_key = directory / "key.pem", directory / "key.pub.pem"
    private_key.write_bytes(private_pem)
    public_key.write_bytes(public_pem)
    sim_port = free_port()
    processes: list[KfeedProcess] = []
    try:
        sim = await start_kfeed("sim", [
            "--listen", f"127.0.0.1:{sim_port}", "--seed", "7", "--markets", "8",
            "--tick-interval", "0.5", "--history-steps", "120", "--sequence-gap-rate", "0.02",
            "--api-key-id", KEY_ID, "--api-public-key-file", str(public_key),
        ], log_dir)  # fmt: skip
        processes.append(sim)
        await wait_for_http(f"http://127.0.0.1:{sim_port}/trade-api/v2/exchange/status", sim)
        url, grpc_address, serve = await start_dashboard(
            log_dir,
            directory / "kfeed.db",
            web_root,
            *extra_serve_args,
        )
        processes.append(serve)
        ingest = await start_kfeed("ingest", [
            "--server", grpc_address, "--mode", "ws",
            "--kalshi-url", f"http://127.0.0.1:{sim_port}/trade-api/v2",
            "--api-key-id", KEY_ID, "--api-private-key-file", str(private_key),
            "--spool-dir", str(directory / "spool"), "--discovery-interval", "2",
        ], log_dir)  # fmt: skip
        processes.append(ingest)
        await wait_for_markets(grpc_address, ingest)
        yield Dashboard(url, grpc_address, processes)
    finally:
        for process in reversed(processes):
            await process.stop()
