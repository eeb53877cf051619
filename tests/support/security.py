"""Test helpers for the secured server: certificates made here, and tokens files.

Certificates are real X.509 (EC P-256, made with cryptography), so the TLS tests exercise the
same handshake production does.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kfeed_server.security.tokens import token_digest

READ_TOKEN = "read-token-0123456789abcdef"
INGEST_TOKEN = "ingest-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
OTHER_READ_TOKEN = "other-read-token-0123456789abcdef"

TOKENS_TOML = f"""
[[token]]
name = "reader"
token = "{READ_TOKEN}"
roles = ["read"]

[[token]]
name = "other-reader"
token = "{OTHER_READ_TOKEN}"
roles = ["read"]

[[token]]
name = "ingester"
token = "{INGEST_TOKEN}"
roles = ["ingest"]

[[token]]
name = "operator"
# sha256 of ADMIN_TOKEN: the file need not hold the secret itself.
sha256 = "{{admin_sha256}}"
roles = ["admin"]
"""


def write_tokens_file(directory: Path) -> Path:
    """A tokens file with two readers, an ingester and an admin (stored as a hash)."""
    path = directory / "tokens.toml"
    path.write_text(TOKENS_TOML.replace("{admin_sha256}", token_digest(ADMIN_TOKEN).hex()))
    return path


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


@dataclass(frozen=True, slots=True)
class Pem:
    """A certificate and its key, as PEM files."""

    cert_file: Path
    key_file: Path


class CertificateAuthority:
    """A throwaway CA that issues server and client certificates into ``directory``."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        certificate = (
            self._builder(self._subject, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_file = directory / f"{name}-ca.pem"
        self.cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

    def _builder(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        now = datetime.now(UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=1))
        )

    def issue(self, common_name: str, *, server: bool) -> Pem:
        """A leaf certificate: for 127.0.0.1/localhost when ``server``, else a client's."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = self._builder(subject, key.public_key()).add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        certificate = builder.sign(self._key, hashes.SHA256())
        pem = Pem(self.directory / f"{common_name}.pem", self.directory / f"{common_name}-key.pem")
        pem.cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        pem.key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return pem
