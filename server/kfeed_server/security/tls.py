"""TLS for the server: certificate and key files, and optionally a client CA for mutual TLS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: the server's certificate chain and key; ``client_ca_file`` turns on mTLS."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``; with a client CA, clients must present a
        certificate it signed (the handshake fails otherwise)."""
        client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
