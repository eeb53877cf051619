"""The tokens file, how callers are recognised, and which role each RPC needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kfeed.v1 import backtest_service_pb2, ingest_service_pb2, market_service_pb2
from kfeed_server.security.interceptor import bearer_token
from kfeed_server.security.policy import required_role
from kfeed_server.security.tokens import Role, TokensFileError, TokenTable, token_digest
from tests.support.security import ADMIN_TOKEN, INGEST_TOKEN, READ_TOKEN, write_tokens_file


def test_plain_and_hashed_tokens_authenticate_as_their_names(tmp_path: Path) -> None:
    table = TokenTable.from_file(write_tokens_file(tmp_path))
    principals = {
        token: table.authenticate(token) for token in (READ_TOKEN, INGEST_TOKEN, ADMIN_TOKEN)
    }
    reader, ingester, operator = principals.values()
    assert [p.name if p else None for p in principals.values()] == [
        "reader",
        "ingester",
        "operator",
    ]
    assert reader is not None
    assert ingester is not None
    assert operator is not None
    assert (reader.has_role(Role.READ), reader.has_role(Role.INGEST)) == (True, False)
    assert (ingester.has_role(Role.INGEST), ingester.has_role(Role.READ)) == (True, False)
    assert all(operator.has_role(role) for role in Role), "admin includes every role"


@pytest.mark.parametrize("presented", ["", READ_TOKEN + "x", READ_TOKEN[:-1], READ_TOKEN.upper()])
def test_anything_but_the_exact_token_is_unknown(tmp_path: Path, presented: str) -> None:
    assert TokenTable.from_file(write_tokens_file(tmp_path)).authenticate(presented) is None


def test_only_digests_are_kept_in_memory(tmp_path: Path) -> None:
    table = TokenTable.from_file(write_tokens_file(tmp_path))
    assert READ_TOKEN not in repr(vars(table)) + repr(table._entries)
    assert any(entry.digest == token_digest(READ_TOKEN) for entry in table._entries)


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("", "no [[token]] entries"),
        ("[[token]]\nname = 'a'\nroles = ['read']\n", "exactly one of token or sha256"),
        ("[[token]]\nname = 'a'\ntoken = 'short'\nroles = ['read']\n", "at least 16"),
        ("[[token]]\nname = 'a'\nsha256 = 'abc'\nroles = ['read']\n", "64 hex digits"),
        ("[[token]]\nname = 'a'\ntoken = '0123456789abcdefg'\nroles = ['root']\n", "roles"),
        ("[[token]]\ntoken = '0123456789abcdefg'\nroles = ['read']\n", "needs a name"),
        (
            "[[token]]\nname = 'a'\ntoken = '0123456789abcdefg'\nroles = ['read']\n"
            "[[token]]\nname = 'b'\ntoken = '0123456789abcdefg'\nroles = ['admin']\n",
            "same token",
        ),
        ("not toml at all [", "cannot read tokens file"),
    ],
)
def test_a_bad_tokens_file_is_refused_with_a_reason(
    tmp_path: Path, content: str, complaint: str
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(content)
    with pytest.raises(TokensFileError, match=complaint.replace("[", r"\[")) as error:
        TokenTable.from_file(path)
    assert "0123456789abcdefg" not in str(error.value), "errors never quote a token"


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer abc "),), "abc"),
        ((("authorization", "Basic abc"),), None),
        ((("authorization", "Bearer "),), None),
        ((("x-other", "Bearer abc"),), None),
        ((), None),
    ],
)
def test_bearer_token_is_read_from_the_authorization_metadata(
    metadata: tuple[tuple[str, str], ...], token: str | None
) -> None:
    assert bearer_token(metadata) == token


def _methods(file_descriptor: object, service: str) -> list[str]:
    descriptor = file_descriptor.services_by_name[service]  # type: ignore[attr-defined]
    return [f"/{descriptor.full_name}/{method.name}" for method in descriptor.methods]


def test_every_contract_rpc_has_a_decided_role() -> None:
    market = _methods(market_service_pb2.DESCRIPTOR, "MarketService")
    backtest = _methods(backtest_service_pb2.DESCRIPTOR, "BacktestService")
    ingest = _methods(ingest_service_pb2.DESCRIPTOR, "IngestService")
    assert {required_role(m) for m in market} == {Role.READ}
    assert {required_role(m) for m in backtest} == {Role.READ}
    assert {required_role(m) for m in ingest} == {Role.INGEST}


def test_health_and_reflection_are_open_and_unknown_services_need_admin() -> None:
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/grpc.health.v1.Health/Watch") is None
    assert required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    assert required_role("/kfeed.v2.NewService/Anything") is Role.ADMIN
