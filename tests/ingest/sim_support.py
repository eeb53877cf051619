"""Helpers to run the ingest side against the real simulator (kfeed_sim) in-process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from kfeed_ingest.kalshi.signing import KalshiCredentials, SecretKey
from kfeed_sim.config import FaultConfig, SimConfig
from kfeed_sim.market_model import MarketStatus
from kfeed_sim.server import SimHandle, running_simulator
from kfeed_sim.signing import generate_key_pair

KEY_ID = "ingest-test-key"


@dataclass
class SignedSim:
    """A running simulator that knows our key, and the credentials to reach it."""

    handle: SimHandle
    credentials: KalshiCredentials
    private_pem: bytes

    def open_tickers(self, limit: int = 4) -> list[str]:
        """Tickers of markets that are trading now."""
        markets = self.handle.exchange.markets.values()
        return sorted(m.ticker for m in markets if m.status is MarketStatus.ACTIVE)[:limit]


@contextlib.asynccontextmanager
async def signed_simulator(
    *, auto_step: bool = False, faults: FaultConfig | None = None, **config: object
) -> AsyncIterator[SignedSim]:
    """A simulator on 127.0.0.1:0 with one registered API key (manual stepping by default)."""
    private_pem, public_pem = generate_key_pair()
    sim_config = SimConfig.model_validate(
        {
            "seed": 7,
            "markets": 6,
            "history_steps": 40,
            "auto_step": auto_step,
            "api_keys": {KEY_ID: public_pem.decode()},
            "faults": faults or FaultConfig(),
            **config,
        }
    )
    async with running_simulator(sim_config) as handle:
        credentials = KalshiCredentials(KEY_ID, SecretKey.from_pem(private_pem))
        yield SignedSim(handle, credentials, private_pem)


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait until ``condition()`` holds, or fail with ``TimeoutError`` after ``within`` seconds.

    Polling is the point here: the condition reads state that no event announces.
    """
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
