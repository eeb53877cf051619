"""Signing: RSA-PSS round trip, and the sim rejecting unsigned or badly signed requests."""

from __future__ import annotations

import base64
import time

import httpx
import pytest
import websockets
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from websockets.exceptions import InvalidStatus

from kfeed_sim.server import SimHandle
from kfeed_sim.signing import generate_key_pair, load_private_key, sign_request, verify_signature
from tests.support.sim import KEY_ID, SimFactory, signed_headers

WS_PATH = "/trade-api/ws/v2"


def test_signature_is_pss_sha256_over_timestamp_method_path(private_key: rsa.RSAPrivateKey) -> None:
    signature = sign_request(private_key, 1_700_000_000_000, "get", "/trade-api/v2/markets?limit=5")
    # verify independently with the documented parameters and message
    private_key.public_key().verify(
        base64.b64decode(signature),
        b"1700000000000GET/trade-api/v2/markets",
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )


def test_verify_accepts_good_and_rejects_tampered(private_key: rsa.RSAPrivateKey) -> None:
    public_key = private_key.public_key()
    signature = sign_request(private_key, 1, "GET", WS_PATH)
    assert verify_signature(public_key, signature, 1, "GET", WS_PATH)
    assert not verify_signature(public_key, signature, 2, "GET", WS_PATH)
    assert not verify_signature(public_key, signature, 1, "POST", WS_PATH)
    assert not verify_signature(public_key, "not base64!", 1, "GET", WS_PATH)
    other = load_private_key(generate_key_pair(1024)[0])
    assert not verify_signature(other.public_key(), signature, 1, "GET", WS_PATH)


async def test_signed_rest_request_is_verified(
    rest: httpx.AsyncClient, sim: SimHandle, private_key: rsa.RSAPrivateKey
) -> None:
    path = "/trade-api/v2/exchange/status"
    good = await rest.get("/exchange/status", headers=signed_headers(private_key, "GET", path))
    assert good.status_code == 200
    bad = signed_headers(private_key, "GET", "/trade-api/v2/markets")  # signed for another path
    response = await rest.get("/exchange/status", headers=bad)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_error"
    unknown = await rest.get(
        "/exchange/status", headers=signed_headers(private_key, "GET", path, "x")
    )
    assert unknown.status_code == 401
    stale = signed_headers(private_key, "GET", path)
    old = int(time.time() * 1000) - 3_600_000
    stale |= {
        "KALSHI-ACCESS-TIMESTAMP": str(old),
        "KALSHI-ACCESS-SIGNATURE": sign_request(private_key, old, "GET", path),
    }
    assert (await rest.get("/exchange/status", headers=stale)).status_code == 401
    assert (await rest.get("/exchange/status")).status_code == 200  # public calls need no key


async def test_websocket_handshake_must_be_signed(
    sim: SimHandle, private_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(InvalidStatus) as unsigned:
        await websockets.connect(sim.ws_url)
    assert unsigned.value.response.status_code == 401
    wrong = signed_headers(private_key, "GET", "/trade-api/v2/markets")
    with pytest.raises(InvalidStatus):
        await websockets.connect(sim.ws_url, additional_headers=wrong)
    async with websockets.connect(
        sim.ws_url, additional_headers=signed_headers(private_key, "GET", WS_PATH)
    ) as socket:
        await socket.send('{"id": 1, "cmd": "nope", "params": {}}')
        assert '"code":5' in str(await socket.recv())


async def test_without_registered_keys_any_key_id_is_accepted_but_headers_are_required(
    make_sim: SimFactory, private_key: rsa.RSAPrivateKey
) -> None:
    async with make_sim(api_keys={}) as sim:
        headers = signed_headers(private_key, "GET", WS_PATH, key_id="anyone")
        async with websockets.connect(sim.ws_url, additional_headers=headers):
            pass
        with pytest.raises(InvalidStatus):
            await websockets.connect(sim.ws_url, additional_headers={"KALSHI-ACCESS-KEY": KEY_ID})
