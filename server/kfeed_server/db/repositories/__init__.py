"""Repositories: async reads and idempotent writes that speak ``kfeed_server.records`` only."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from kfeed_server.db.engine import session_factory
from kfeed_server.db.repositories.backtests import BacktestRepository
from kfeed_server.db.repositories.books import OrderBookRepository
from kfeed_server.db.repositories.candles import CandleSourceRepository
from kfeed_server.db.repositories.export import ArrowExportReader
from kfeed_server.db.repositories.ingest import BatchWriteResult, IngestWriter
from kfeed_server.db.repositories.markets import MarketRepository
from kfeed_server.db.repositories.secrets import SecretRepository
from kfeed_server.db.repositories.snapshots import SnapshotRepository
from kfeed_server.db.repositories.trades import FeedGapRepository, TradeRepository
from kfeed_server.records.backtest import BacktestRecord


@dataclass(frozen=True, slots=True)
class Repositories:
    """Every repository on one engine; what the servicers are built from."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    markets: MarketRepository
    snapshots: SnapshotRepository
    trades: TradeRepository
    feed_gaps: FeedGapRepository
    ingest: IngestWriter
    backtests: BacktestRepository
    candle_sources: CandleSourceRepository
    secrets: SecretRepository
    books: OrderBookRepository
    exports: ArrowExportReader


def build_repositories(engine: AsyncEngine, writer: AsyncEngine | None = None) -> Repositories:
    """All repositories sharing one session factory on ``engine``; the ingest writer's on
    ``writer`` when given (db.engine.create_writer_engine)."""
    sessions = session_factory(engine)
    return Repositories(
        engine=engine,
        sessions=sessions,
        markets=MarketRepository(sessions),
        snapshots=SnapshotRepository(sessions),
        trades=TradeRepository(sessions),
        feed_gaps=FeedGapRepository(sessions),
        ingest=IngestWriter(sessions if writer is None else session_factory(writer)),
        backtests=BacktestRepository(sessions),
        candle_sources=CandleSourceRepository(sessions),
        secrets=SecretRepository(sessions),
        books=OrderBookRepository(sessions),
        exports=ArrowExportReader(engine, sessions),
    )


__all__ = [
    "ArrowExportReader",
    "BacktestRecord",
    "BacktestRepository",
    "BatchWriteResult",
    "CandleSourceRepository",
    "FeedGapRepository",
    "IngestWriter",
    "MarketRepository",
    "OrderBookRepository",
    "Repositories",
    "SecretRepository",
    "SnapshotRepository",
    "TradeRepository",
    "build_repositories",
]
