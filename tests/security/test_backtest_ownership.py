"""A backtest belongs to the token that created it: readers cancel their own runs only, an admin
cancels anyone's. Real server with a tokens file, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed.v1 import ingest_service_pb2
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.security import SecurityConfig
from kfeed_server.transport.convert import market_to_proto
from tests.support.factories import make_market
from tests.support.security import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    OTHER_READ_TOKEN,
    READ_TOKEN,
    bearer,
    write_tokens_file,
)
from tests.support.servers import PublishSession, plaintext_channel, running_server

TICKER = "KXOWN-26DEC05-T1"


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[KfeedServer]:
    security = SecurityConfig(auth_tokens_file=write_tokens_file(tmp_path))
    async with running_server(ServerConfig(database_url=database_url, security=security)) as s:
        yield s


@pytest.fixture
async def stub(server: KfeedServer) -> AsyncIterator[pb_grpc.BacktestServiceAsyncStub]:
    async with plaintext_channel(server) as channel:
        call = ingest_service_pb2.PublishRequest(
            batch_id=1, producer="ownership", markets=[market_to_proto(make_market(TICKER))]
        )
        session = PublishSession(channel, metadata=bearer(INGEST_TOKEN))
        async with session:
            assert (await session.send(call)).code == 0
        yield pb_grpc.BacktestServiceStub(channel)


async def _create(stub: pb_grpc.BacktestServiceAsyncStub, token: str) -> str:
    request = pb.CreateBacktestRequest(
        config=pb.BacktestConfig(strategy="threshold", tickers=[TICKER])
    )
    response = await stub.CreateBacktest(request, metadata=bearer(token))
    return response.backtest.backtest_id


async def _cancel_code(
    stub: pb_grpc.BacktestServiceAsyncStub, backtest_id: str, token: str
) -> grpc.StatusCode:
    try:
        await stub.CancelBacktest(
            pb.CancelBacktestRequest(backtest_id=backtest_id), metadata=bearer(token)
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_a_reader_cancels_its_own_backtest_but_not_anothers(
    stub: pb_grpc.BacktestServiceAsyncStub, server: KfeedServer
) -> None:
    mine = await _create(stub, READ_TOKEN)
    stored = await server.repositories.backtests.get(mine)
    assert stored is not None
    assert stored.created_by == "reader"
    shown = await stub.GetBacktest(
        pb.GetBacktestRequest(backtest_id=mine), metadata=bearer(OTHER_READ_TOKEN)
    )
    assert shown.backtest.creator == "reader"
    assert await _cancel_code(stub, mine, OTHER_READ_TOKEN) == grpc.StatusCode.PERMISSION_DENIED
    assert await _cancel_code(stub, mine, READ_TOKEN) == grpc.StatusCode.OK


async def test_an_admin_cancels_anyones_backtest(stub: pb_grpc.BacktestServiceAsyncStub) -> None:
    theirs = await _create(stub, OTHER_READ_TOKEN)
    assert await _cancel_code(stub, theirs, ADMIN_TOKEN) == grpc.StatusCode.OK


async def test_the_refusal_names_the_admin_role_and_not_the_owner(
    stub: pb_grpc.BacktestServiceAsyncStub,
) -> None:
    theirs = await _create(stub, OTHER_READ_TOKEN)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CancelBacktest(
            pb.CancelBacktestRequest(backtest_id=theirs), metadata=bearer(READ_TOKEN)
        )
    assert "admin" in (refused.value.details() or "")
    assert "other-reader" not in (refused.value.details() or "")
