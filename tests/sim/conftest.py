"""Simulators on 127.0.0.1:0, signing keys and helpers shared by the simulator tests.

Sims here step only when a test says so (``auto_step=False``), so every test sees exactly the
frames and states it caused.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from kfeed_sim.config import SimConfig
from kfeed_sim.server import SimHandle, running_simulator
from kfeed_sim.signing import generate_key_pair, load_private_key, sign_request

KEY_ID = "test-key"
START = datetime(2026, 3, 12, 15, 0, tzinfo=UTC)

SimFactory = Callable[..., AbstractAsyncContextManager[SimHandle]]


@pytest.fixture(scope="session")
def key_pair() -> tuple[bytes, bytes]:
    """One RSA key pair (private PEM, public PEM) for the whole run: generating is slow."""
    return generate_key_pair()


@pytest.fixture(scope="session")
def private_key(key_pair: tuple[bytes, bytes]) -> rsa.RSAPrivateKey:
    """The private half of ``key_pair``."""
    return load_private_key(key_pair[0])


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


@pytest.fixture(scope="session")
def make_sim(key_pair: tuple[bytes, bytes]) -> SimFactory:
    """``async with make_sim(**overrides) as sim`` starts a fresh simulator."""

    def factory(**overrides: object) -> AbstractAsyncContextManager[SimHandle]:
        return running_simulator(sim_config(key_pair[1], **overrides))

    return factory


@pytest.fixture(scope="module")
async def sim(make_sim: SimFactory) -> AsyncIterator[SimHandle]:
    """A simulator shared by one module (tests must not change its faults)."""
    async with make_sim() as handle:
        handle.advance(20)  # past the first live opening, so live markets are trading
        yield handle


@pytest.fixture
async def rest(sim: SimHandle) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the shared sim's REST base URL."""
    async with httpx.AsyncClient(base_url=sim.rest_url, timeout=5) as client:
        yield client


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
