"""Verification of Kalshi's signed requests (REST with signing headers, the WebSocket handshake)."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric import rsa

from kfeed_sim.config import SimConfig
from kfeed_sim.signing import load_public_key, verify_signature

KEY_HEADER = "kalshi-access-key"
TIMESTAMP_HEADER = "kalshi-access-timestamp"
SIGNATURE_HEADER = "kalshi-access-signature"
SIGNING_HEADERS = (KEY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)


class Verifier:
    """Checks the three ``KALSHI-ACCESS-*`` headers against the registered public keys.

    With no keys registered any key id is accepted, but the headers must still be present and
    well-formed (a fresh millisecond timestamp and a base64 signature).
    """

    def __init__(self, config: SimConfig) -> None:
        self._max_age_ms = config.signature_max_age_seconds * 1_000
        self._keys: dict[str, rsa.RSAPublicKey] = {
            key_id: load_public_key(pem.encode()) for key_id, pem in config.api_keys.items()
        }

    def failure(self, headers: Mapping[str, str], method: str, path: str) -> str | None:
        """Why this request is not properly signed, or None when it is."""
        key_id, timestamp, signature = (headers.get(name, "") for name in SIGNING_HEADERS)
        if not (key_id and timestamp and signature):
            return "missing KALSHI-ACCESS-KEY, -TIMESTAMP or -SIGNATURE header"
        if not timestamp.isdigit():
            return "KALSHI-ACCESS-TIMESTAMP must be milliseconds since the epoch"
        if abs(time.time() * 1_000 - int(timestamp)) > self._max_age_ms:
            return "KALSHI-ACCESS-TIMESTAMP is too far from the server time"
        if not self._keys:
            return None if _is_base64(signature) else "KALSHI-ACCESS-SIGNATURE is not base64"
        public_key = self._keys.get(key_id)
        if public_key is None:
            return "unknown API key"
        if not verify_signature(public_key, signature, int(timestamp), method, path):
            return "invalid signature"
        return None


def _is_base64(text: str) -> bool:
    try:
        return bool(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return False
