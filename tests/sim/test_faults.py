"""Every fault knob is observable, switchable at runtime, and seeded."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import ConnectionClosed

from kfeed_sim.config import FaultConfig
from kfeed_sim.server import SimHandle
from tests.support.sim import SimFactory
from tests.support.wsclient import sim_socket


async def statuses(client: httpx.AsyncClient, count: int = 40) -> list[int]:
    return [(await client.get("/trade-api/v2/exchange/status")).status_code for _ in range(count)]


@pytest.fixture(scope="module")
async def sim_with_faults(make_sim: SimFactory) -> AsyncIterator[SimHandle]:
    """A sim of its own: these tests flip its faults through the admin endpoint."""
    async with make_sim() as handle:
        yield handle


@pytest.fixture
async def admin(sim_with_faults: SimHandle) -> AsyncIterator[httpx.AsyncClient]:
    """A client on the sim's root, for ``/_sim/…`` and ``/trade-api/v2/…``."""
    async with httpx.AsyncClient(base_url=sim_with_faults.base_url, timeout=5) as client:
        yield client


async def test_429_without_and_with_retry_after(admin: httpx.AsyncClient) -> None:
    await admin.post("/_sim/faults", json={"rate_limit_rate": 1.0})
    limited = await admin.get("/trade-api/v2/markets")
    assert limited.status_code == 429
    assert limited.json() == {"error": "too many requests"}
    assert "retry-after" not in limited.headers
    await admin.post("/_sim/faults", json={"retry_after_seconds": 2})
    assert (await admin.get("/trade-api/v2/markets")).headers["retry-after"] == "2"
    await admin.post("/_sim/faults", json={"rate_limit_rate": 0.0, "retry_after_seconds": None})
    assert set(await statuses(admin, 5)) == {200}


async def test_error_rate_gives_5xx_in_kalshi_shape(admin: httpx.AsyncClient) -> None:
    await admin.post("/_sim/faults", json={"error_rate": 0.5, "seed": 11})
    seen = await statuses(admin)
    await admin.post("/_sim/faults", json={"error_rate": 0.0})
    assert 200 in seen
    assert {s for s in seen if s != 200} <= {500, 502, 503}
    assert 5 < sum(s >= 500 for s in seen) < 35


async def test_faults_are_seeded(admin: httpx.AsyncClient) -> None:
    runs = []
    for _ in range(2):
        await admin.post("/_sim/faults", json={"error_rate": 0.3, "seed": 42})
        runs.append([s >= 500 for s in await statuses(admin, 20)])
    await admin.post("/_sim/faults", json={"error_rate": 0.0})
    assert runs[0] == runs[1]
    assert any(runs[0])


async def test_malformed_bodies_are_truncated_json(admin: httpx.AsyncClient) -> None:
    await admin.post("/_sim/faults", json={"malformed_rate": 1.0})
    response = await admin.get("/trade-api/v2/markets")
    await admin.post("/_sim/faults", json={"malformed_rate": 0.0})
    assert response.status_code == 200
    assert response.text.startswith('{"markets":')
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.text)


async def test_latency_is_added(admin: httpx.AsyncClient) -> None:
    await admin.post("/_sim/faults", json={"latency_ms": 300})
    started = time.perf_counter()
    await admin.get("/trade-api/v2/exchange/status")
    elapsed = time.perf_counter() - started
    await admin.post("/_sim/faults", json={"latency_ms": 0})
    assert elapsed >= 0.3


async def test_bad_fault_settings_are_refused(admin: httpx.AsyncClient) -> None:
    response = await admin.post("/_sim/faults", json={"error_rate": 2})
    assert response.status_code == 400
    assert (await admin.get("/_sim/faults")).json()["error_rate"] == 0.0


async def test_socket_dropped_every_n_frames(
    make_sim: SimFactory, private_key: rsa.RSAPrivateKey
) -> None:
    async with make_sim() as sim, sim_socket(sim.ws_url, private_key) as socket:
        sim.set_faults(FaultConfig(drop_socket_every=5))
        await socket.command("subscribe", channels=["ticker", "trade"])
        await socket.frame(), await socket.frame()  # subscribed, before any data
        sim.advance(10)
        data: list[dict[str, Any]] = []

        async def read_until_closed() -> None:
            while True:
                frame = await socket.frame()
                data.extend([frame] if "seq" in frame else [])

        with pytest.raises(ConnectionClosed):
            await read_until_closed()
        assert len(data) == 5


async def test_sequence_gaps_skip_seq_numbers(
    make_sim: SimFactory, private_key: rsa.RSAPrivateKey
) -> None:
    async with make_sim() as sim, sim_socket(sim.ws_url, private_key) as socket:
        sim.set_faults(FaultConfig(sequence_gap_rate=0.2))
        await socket.command("subscribe", channels=["ticker"])
        await socket.frame()
        sim.advance(20)
        seqs = [f["seq"] for f in await socket.frames_until_quiet() if "seq" in f]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)
        assert seqs[-1] > len(seqs)  # some numbers were skipped


async def test_truth_endpoint_lists_states_and_trades(
    admin: httpx.AsyncClient, sim_with_faults: SimHandle
) -> None:
    sim_with_faults.advance(20)
    truth = (await admin.get("/_sim/truth")).json()
    assert truth["units"]["price"] == "integer 1/10000 USD"
    market = next(m for m in truth["markets"] if m["trades"])
    model = sim_with_faults.exchange.markets[market["ticker"]]
    assert len(market["states"]) == len(model.states)
    assert market["states"][-1]["yes_bid"] == model.state.yes_bid
    assert [t["trade_id"] for t in market["trades"]] == [t.trade_id for t in model.trades]
    only = (await admin.get("/_sim/truth", params={"tickers": market["ticker"]})).json()
    assert [m["ticker"] for m in only["markets"]] == [market["ticker"]]
