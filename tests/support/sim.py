"""The simulator (kfeed_sim) in-process: small manually stepped configurations, signed request
headers, and a simulator that knows a key, with the ingest's credentials to reach it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric import rsa

from kfeed_ingest.kalshi.signing import KalshiCredentials, SecretKey
from kfeed_sim.config import FaultConfig, SimConfig
from kfeed_sim.market_model import MarketStatus
from kfeed_sim.server import SimHandle, running_simulator
from kfeed_sim.signing import generate_key_pair, sign_request

KEY_ID = "test-key"
START = datetime(2026, 3, 12, 15, 0, tzinfo=UTC)

SimFactory = Callable[..., AbstractAsyncContextManager[SimHandle]]


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


def sim_config(public_pem: bytes, **overrides: object) -> SimConfig:
    """A small, fast, manually stepped sim that knows ``KEY_ID``."""
    settings: dict[str, object] = {
        "seed": 3,
        "markets": 6,
        "tick_interval": 0.25,
        "auto_step": False,
        "start_time": START,
        "history_steps": 120,
        "api_keys": {KEY_ID: public_pem.decode()},
    }
    return SimConfig.model_validate(settings | overrides)


def signed_headers(
    private_key: rsa.RSAPrivateKey, method: str, path: str, key_id: str = KEY_ID
) -> dict[str, str]:
    """The three ``KALSHI-ACCESS-*`` headers for one request signed now."""
    timestamp = int(time.time() * 1_000)
    return {
        "KALSHI-ACCESS-KEY": key_id,
        "KALSHI-ACCESS-TIMESTAMP": str(timestamp),
        "KALSHI-ACCESS-SIGNATURE": sign_request(private_key, timestamp, method, path),
    }
