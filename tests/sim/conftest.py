"""Fixtures of the simulator tests: simulators on 127.0.0.1:0 and one signing key pair.

Sims here step only when a test says so (``auto_step=False``), so every test sees exactly the
frames and states it caused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from kfeed_sim.server import SimHandle, running_simulator
from kfeed_sim.signing import generate_key_pair, load_private_key
from tests.support.sim import SimFactory, sim_config


@pytest.fixture(scope="session")
def key_pair() -> tuple[bytes, bytes]:
    """One RSA key pair (private PEM, public PEM) for the whole run: generating is slow."""
    return generate_key_pair()


@pytest.fixture(scope="session")
def private_key(key_pair: tuple[bytes, bytes]) -> rsa.RSAPrivateKey:
    """The private half of ``key_pair``."""
    return load_private_key(key_pair[0])


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
