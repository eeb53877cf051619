"""Kalshi request signing: RSA-PSS (SHA-256, MGF1-SHA256, salt = digest length), base64.

The signed message is ``str(timestamp_ms) + METHOD + path`` with the path including
``/trade-api/v2`` (or ``/trade-api/ws/v2`` for the WebSocket handshake) and no query string.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def signed_message(timestamp_ms: int, method: str, path: str) -> bytes:
    """The bytes that get signed: ``timestamp + METHOD + path`` (query string dropped)."""
    return f"{timestamp_ms}{method.upper()}{path.split('?', 1)[0]}".encode()


def sign_request(private_key: rsa.RSAPrivateKey, timestamp_ms: int, method: str, path: str) -> str:
    """The ``KALSHI-ACCESS-SIGNATURE`` header value for one request."""
    signature = private_key.sign(signed_message(timestamp_ms, method, path), _PSS, hashes.SHA256())
    return base64.b64encode(signature).decode("ascii")


def verify_signature(
    public_key: rsa.RSAPublicKey, signature_b64: str, timestamp_ms: int, method: str, path: str
) -> bool:
    """True when ``signature_b64`` is a valid signature of this request by ``public_key``."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        public_key.verify(
            signature, signed_message(timestamp_ms, method, path), _PSS, hashes.SHA256()
        )
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def generate_key_pair(key_size: int = 2048) -> tuple[bytes, bytes]:
    """A fresh RSA key pair as (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def load_private_key(pem: bytes) -> rsa.RSAPrivateKey:
    """An RSA private key from PEM (unencrypted), as Kalshi hands out."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError("Kalshi API keys are RSA keys")
    return key


def load_public_key(pem: bytes) -> rsa.RSAPublicKey:
    """An RSA public key from PEM."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise TypeError("Kalshi API keys are RSA keys")
    return key
