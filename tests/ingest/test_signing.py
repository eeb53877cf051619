"""Kalshi request signing: the signed string, the headers, a verifiable signature, no key leaks."""

from __future__ import annotations

import base64
import logging
import pickle
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kfeed_ingest.kalshi.signing import (
    ACCESS_KEY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    KalshiCredentials,
    SecretKey,
    pss_padding,
    signing_message,
)


@pytest.fixture(scope="module")
def private_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_signed_message_is_timestamp_method_and_path_without_query() -> None:
    message = signing_message(1703123456789, "get", "/trade-api/v2/markets?limit=1000&cursor=x")
    assert message == "1703123456789GET/trade-api/v2/markets"


def test_signed_message_from_a_full_url_keeps_only_the_path() -> None:
    url = "wss://external-api-ws.kalshi.com/trade-api/ws/v2"
    assert signing_message(1, "GET", url) == "1GET/trade-api/ws/v2"


def test_headers_carry_key_timestamp_and_a_pss_signature_the_public_key_verifies(
    private_pem: bytes,
) -> None:
    credentials = KalshiCredentials("key-123", SecretKey.from_pem(private_pem))
    headers = credentials.headers("GET", "/trade-api/v2/portfolio/balance?x=1", 1703123456789)

    assert headers[ACCESS_KEY_HEADER] == "key-123"
    assert headers[TIMESTAMP_HEADER] == "1703123456789"
    public = credentials.private_key.public_key()
    signature = base64.b64decode(headers[SIGNATURE_HEADER])
    public.verify(
        signature,
        b"1703123456789GET/trade-api/v2/portfolio/balance",
        pss_padding(),
        hashes.SHA256(),
    )
    with pytest.raises(InvalidSignature):
        public.verify(
            signature,
            b"1703123456789POST/trade-api/v2/portfolio/balance",
            pss_padding(),
            hashes.SHA256(),
        )


def test_secret_key_never_shows_itself(
    private_pem: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(private_pem)
    credentials = KalshiCredentials.from_files("key-123", key_file)
    caplog.set_level(logging.DEBUG)
    logging.getLogger("test").info("credentials %r %s", credentials, credentials.private_key)

    pem_body = private_pem.decode().splitlines()[1]
    for text in (repr(credentials), str(credentials.private_key), caplog.text):
        assert pem_body not in text
    assert "redacted" in repr(credentials.private_key)
    assert "private_key" not in repr(credentials)
    with pytest.raises(TypeError):
        pickle.dumps(credentials.private_key)


def test_a_non_rsa_or_garbled_pem_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="not a readable PEM") as caught:
        SecretKey.from_pem(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    assert "c2VjcmV0" not in str(caught.value)
