"""Bearer tokens and their roles, loaded from a TOML tokens file.

Only SHA-256 digests of the tokens are kept in memory, and a presented token is compared with
every digest in constant time, so neither memory dumps nor response timing reveal a token.

The tokens file is a list of ``[[token]]`` tables, each with a ``name`` (used in logs and rate
limiting in place of the secret), ``roles``, and either the token's ``sha256`` hex digest
(preferred: the file then holds no secret) or the plain ``token``::

    [[token]]
    name = "ingest-eu"
    sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    roles = ["ingest"]

    [[token]]
    name = "dashboard"
    token = "a long random string"
    roles = ["read"]
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Short tokens can be guessed; 16 characters of a random token carry ~96 bits.
MIN_TOKEN_LENGTH = 16


class Role(enum.StrEnum):
    """What a caller may do. ``admin`` includes every other role."""

    READ = "read"
    INGEST = "ingest"
    ADMIN = "admin"


class TokensFileError(ValueError):
    """The tokens file cannot be used; the message says where and why (never the token)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the token's name and roles."""

    name: str
    roles: frozenset[Role]

    def has_role(self, role: Role) -> bool:
        return role in self.roles or Role.ADMIN in self.roles


ANONYMOUS = Principal("anonymous", frozenset({Role.ADMIN}))
"""The caller when authentication is off (loopback only): allowed everything."""


@dataclass(frozen=True, slots=True)
class _TokenEntry:
    digest: bytes
    principal: Principal


def token_digest(token: str) -> bytes:
    """The SHA-256 digest under which a token is stored."""
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """The configured tokens, by digest. Look callers up with :meth:`authenticate`."""

    def __init__(self, entries: Iterable[tuple[bytes, Principal]]) -> None:
        self._entries = tuple(_TokenEntry(digest, principal) for digest, principal in entries)
        digests = [entry.digest for entry in self._entries]
        if len(set(digests)) != len(digests):
            raise TokensFileError("the same token is configured twice")
        names = [entry.principal.name for entry in self._entries]
        if len(set(names)) != len(names):
            raise TokensFileError("token names must be unique")

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> Principal | None:
        """The principal ``token`` belongs to, or None.

        Every entry is compared, match or not, so the time taken does not depend on which
        entry (if any) matched.
        """
        presented = token_digest(token)
        found: Principal | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, presented):
                found = entry.principal
        return found

    @classmethod
    def from_file(cls, path: Path) -> TokenTable:
        """Load a tokens file (format in the module docstring)."""
        try:
            document = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise TokensFileError(f"cannot read tokens file {path}: {error}") from None
        tables = document.get("token", [])
        if not isinstance(tables, list) or not tables:
            raise TokensFileError(f"{path}: no [[token]] entries")
        return cls(_parse_entry(path, index, table) for index, table in enumerate(tables))


def _parse_entry(path: Path, index: int, table: object) -> tuple[bytes, Principal]:
    where = f"{path}: token #{index + 1}"
    if not isinstance(table, dict):
        raise TokensFileError(f"{where}: must be a [[token]] table")
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise TokensFileError(f"{where}: needs a name")
    where = f"{path}: token {name!r}"
    roles = table.get("roles")
    known = {role.value for role in Role}
    if not isinstance(roles, list) or not roles or not all(r in known for r in roles):
        raise TokensFileError(f"{where}: roles must be a non-empty list of {sorted(known)}")
    plain, hexdigest = table.get("token"), table.get("sha256")
    if (plain is None) == (hexdigest is None):
        raise TokensFileError(f"{where}: give exactly one of token or sha256")
    if plain is not None:
        if not isinstance(plain, str) or len(plain) < MIN_TOKEN_LENGTH:
            raise TokensFileError(f"{where}: token must be at least {MIN_TOKEN_LENGTH} characters")
        digest = token_digest(plain)
    else:
        try:
            digest = bytes.fromhex(str(hexdigest))
        except ValueError:
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise TokensFileError(f"{where}: sha256 must be 64 hex digits")
    return digest, Principal(name, frozenset(Role(r) for r in roles))
