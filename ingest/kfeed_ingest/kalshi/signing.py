"""RSA-PSS request signing for the Kalshi Trade API.

Kalshi authenticates a request with three headers: the key id, a millisecond timestamp and a
base64 RSA-PSS signature (SHA-256, MGF1-SHA-256, salt length = digest length) over
``timestamp + METHOD + path``, where ``path`` is the URL path without its query string. The
WebSocket handshake signs ``timestamp + "GET" + "/trade-api/ws/v2"`` the same way.

The private key lives only inside :class:`SecretKey`, whose ``repr`` and ``str`` are redacted so
that it can never end up in a log line, a traceback's locals or a settings dump.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ACCESS_KEY_HEADER = "KALSHI-ACCESS-KEY"
TIMESTAMP_HEADER = "KALSHI-ACCESS-TIMESTAMP"
SIGNATURE_HEADER = "KALSHI-ACCESS-SIGNATURE"

_REDACTED = "SecretKey(<redacted>)"


def pss_padding() -> padding.PSS:
    """The padding Kalshi expects: MGF1 with SHA-256 and a salt as long as the digest."""
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


class SecretKey:
    """An RSA private key that refuses to show itself.

    ``repr``/``str`` are redacted and pickling is refused, so the key cannot leak through logging,
    exception reports or an accidental serialisation of a settings object.
    """

    __slots__ = ("_key",)

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._key = key

    @classmethod
    def from_pem(cls, pem: bytes | str, password: bytes | None = None) -> SecretKey:
        """Load a PEM-encoded RSA private key (PKCS#1 or PKCS#8)."""
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_private_key(data, password=password)
        except (ValueError, TypeError) as exc:
            # The library's message can quote key material; replace it with a neutral one.
            raise ValueError(f"not a readable PEM private key ({type(exc).__name__})") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("Kalshi API keys are RSA keys; this PEM holds another key type")
        return cls(key)

    @classmethod
    def from_file(cls, path: Path | str, password: bytes | None = None) -> SecretKey:
        """Load the PEM key file Kalshi issues with an API key id."""
        return cls.from_pem(Path(path).read_bytes(), password)

    def sign(self, message: bytes) -> bytes:
        """RSA-PSS/SHA-256 signature of ``message`` (randomised: verify, never compare bytes)."""
        return self._key.sign(message, pss_padding(), hashes.SHA256())

    def public_key(self) -> rsa.RSAPublicKey:
        """The matching public key (safe to show)."""
        return self._key.public_key()

    def __repr__(self) -> str:
        return _REDACTED

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretKey cannot be pickled")


def signing_message(timestamp_ms: int, method: str, url_or_path: str) -> str:
    """The exact string Kalshi signs: timestamp, upper-case method, path without query."""
    path = urlsplit(url_or_path).path or "/"
    return f"{timestamp_ms}{method.upper()}{path}"


@dataclass(frozen=True, slots=True)
class KalshiCredentials:
    """An API key id and its private key; produces the three authentication headers."""

    key_id: str
    private_key: SecretKey = field(repr=False)

    @classmethod
    def from_files(cls, key_id: str, private_key_file: Path | str) -> KalshiCredentials:
        """Credentials from a key id and the path of its PEM file."""
        return cls(key_id=key_id, private_key=SecretKey.from_file(private_key_file))

    def headers(
        self, method: str, url_or_path: str, timestamp_ms: int | None = None
    ) -> dict[str, str]:
        """Headers authenticating one request (``timestamp_ms`` defaults to now)."""
        stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        message = signing_message(stamp, method, url_or_path).encode()
        signature = base64.b64encode(self.private_key.sign(message)).decode("ascii")
        return {
            ACCESS_KEY_HEADER: self.key_id,
            TIMESTAMP_HEADER: str(stamp),
            SIGNATURE_HEADER: signature,
        }
