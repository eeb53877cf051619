"""LiveSession, the WebSocket protocol core without I/O: which gaps make which markets stale, the
REST reads it asks for, and how their results repair the live state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from kfeed.v1 import ingest_service_pb2, types_pb2
from kfeed_ingest.kalshi.books import BookChange, CheckpointPolicy, micros
from kfeed_ingest.kalshi.models import KalshiMarket, KalshiTrade
from kfeed_ingest.kalshi.normalise import snapshot_from_market
from kfeed_ingest.kalshi.session import ALL_CHANNELS, FeedItem, LiveSession, WebSocketStats

A, B = "KXSIM-26MAR01-A", "KXSIM-26MAR01-B"
TICKER_SID, TRADE_SID, BOOK_SID, LIFECYCLE_SID = 1, 2, 3, 4  # subscribed in ALL_CHANNELS order
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return START + timedelta(seconds=seconds)


def rest_market(ticker: str, updated: datetime, **fields: str) -> KalshiMarket:
    """A market as ``/markets`` shows it: quote 0.42 (10) / 0.46 (20), last 0.44."""
    return KalshiMarket.model_validate(
        {
            "ticker": ticker,
            "status": "active",
            "updated_time": updated.isoformat(),
            "yes_bid_dollars": "0.4200",
            "yes_ask_dollars": "0.4600",
            "no_bid_dollars": "0.5400",
            "no_ask_dollars": "0.5800",
            "yes_bid_size_fp": "10.00",
            "yes_ask_size_fp": "20.00",
            "last_price_dollars": "0.4400",
            "volume_fp": "100.00",
            "open_interest_fp": "50.00",
            **fields,
        }
    )


def session(*tickers: str, seeded: bool = True) -> LiveSession:
    """A session whose four channels are subscribed, seeded from REST as the runner does."""
    known = {t: snapshot_from_market(rest_market(t, START), START) for t in tickers if seeded}
    live = LiveSession(list(tickers), ALL_CHANNELS, known, WebSocketStats())
    for sid, channel in enumerate(ALL_CHANNELS, 1):
        live.handle({"type": "subscribed", "msg": {"channel": channel, "sid": sid}}, START)
    return live


def frame(kind: str, sid: int, seq: int, **msg: Any) -> dict[str, Any]:
    return {"type": kind, "sid": sid, "seq": seq, "msg": msg}


def ticker_frame(seq: int, ticker: str, when: datetime, volume: str = "100.00") -> dict[str, Any]:
    return frame(
        "ticker",
        TICKER_SID,
        seq,
        market_ticker=ticker,
        price_dollars="0.4400",
        yes_bid_dollars="0.4200",
        yes_ask_dollars="0.4600",
        yes_bid_size_fp="10.00",
        yes_ask_size_fp="20.00",
        volume_fp=volume,
        open_interest_fp="50.00",
        ts_ms=int(when.timestamp() * 1000),
    )


def book_frame(seq: int, ticker: str) -> dict[str, Any]:
    """The book behind the quote above, with a second YES level under the top."""
    return frame(
        "orderbook_snapshot",
        BOOK_SID,
        seq,
        market_ticker=ticker,
        yes_dollars_fp=[["0.4100", "5.00"], ["0.4200", "10.00"]],
        no_dollars_fp=[["0.5400", "20.00"]],
    )


def delta_frame(seq: int, ticker: str, when: datetime, price: str, delta: str) -> dict[str, Any]:
    return frame(
        "orderbook_delta",
        BOOK_SID,
        seq,
        market_ticker=ticker,
        price_dollars=price,
        delta_fp=delta,
        side="yes",
        ts_ms=int(when.timestamp() * 1000),
    )


def trade(trade_id: str, ticker: str, when: datetime) -> KalshiTrade:
    return KalshiTrade.model_validate(
        {
            "trade_id": trade_id,
            "ticker": ticker,
            "count_fp": "3.00",
            "yes_price_dollars": "0.4400",
            "no_price_dollars": "0.5600",
            "taker_outcome_side": "yes",
            "created_time": when.isoformat(),
        }
    )


def snapshots(items: list[FeedItem]) -> list[types_pb2.MarketSnapshot]:
    return [i for i in items if isinstance(i, types_pb2.MarketSnapshot)]


def gaps(items: list[FeedItem]) -> list[types_pb2.FeedGap]:
    return [i for i in items if isinstance(i, types_pb2.FeedGap)]


def time_of(snapshot: types_pb2.MarketSnapshot) -> datetime:
    return snapshot.exchange_time.ToDatetime(tzinfo=UTC)


def test_a_ticker_gap_asks_for_every_market_of_the_subscription_over_rest() -> None:
    live = session(A, B)
    assert [s.ticker for s in snapshots(live.handle(ticker_frame(1, A, at(1)), at(1)))] == [A]
    items = live.handle(ticker_frame(3, B, at(2)), at(2))
    (gap,) = gaps(items)
    assert (gap.channel, gap.expected_sequence, gap.received_sequence) == ("ticker", 2, 3)
    assert not gap.recovered
    resync = live.take_resync()
    assert resync is not None
    assert resync.tickers == {A, B}  # the lost frame could have been either market's
    assert list(resync.gaps) == [gap]
    assert resync.trades_since is None
    assert live.take_resync() is None  # taken once


def test_a_rest_read_refreshes_the_live_state_and_recovers_the_gap() -> None:
    live = session(A, B)
    live.handle(book_frame(1, A), at(0))
    live.handle(ticker_frame(1, A, at(1)), at(1))
    live.handle(ticker_frame(3, B, at(2)), at(2))  # a ticker gap
    # Until REST answers, A's book-only instants are held back: its activity may be stale.
    live.handle(delta_frame(2, A, at(3), "0.4100", "1.00"), at(3))
    assert live.flush() == []
    resync = live.take_resync()
    assert resync is not None
    fresh = {"volume_fp": "180.00", "last_price_dollars": "0.4500", "open_interest_fp": "70.00"}
    items = live.apply_resync(
        resync, [rest_market(A, at(4), **fresh), rest_market(B, at(2))], [], at(5)
    )
    (rest_a,) = [s for s in snapshots(items) if s.ticker == A]
    assert time_of(rest_a) == at(4)  # the exchange's updated_time, not the receive time
    assert (rest_a.volume.hundredths, rest_a.last_price.ten_thousandths) == (18_000, 4500)
    assert [s.ticker for s in snapshots(items)] == [A]  # B's REST state is its last ticker's
    assert {m.ticker for m in items if isinstance(m, KalshiMarket)} == {A, B}
    (recovered,) = gaps(items)
    assert recovered.recovered
    assert recovered.HasField("recover_time")
    assert (recovered.subscription_id, recovered.expected_sequence) == (TICKER_SID, 2)
    # The next book-only instant shows the socket's book with the activity REST restored.
    live.handle(delta_frame(3, A, at(6), "0.4100", "1.00"), at(6))
    (live_a,) = snapshots(live.flush())
    assert time_of(live_a) == at(6)
    assert live_a.source == types_pb2.DATA_SOURCE_WEBSOCKET
    assert (live_a.volume.hundredths, live_a.open_interest.hundredths) == (18_000, 7_000)


def test_trades_lost_in_a_gap_are_read_again_from_the_last_one_received() -> None:
    live = session(A, B)
    first = {"count_fp": "1.00", "yes_price_dollars": "0.4400", "taker_outcome_side": "no"}
    live.handle(frame("trade", TRADE_SID, 1, trade_id="t1", market_ticker=A, ts=61, **first), at(1))
    items = live.handle(
        frame("trade", TRADE_SID, 4, trade_id="t4", market_ticker=B, ts=62, **first), at(2)
    )
    (gap,) = gaps(items)
    resync = live.take_resync()
    assert resync is not None
    assert resync.trades_since == datetime(1970, 1, 1, 0, 1, 1, tzinfo=UTC)  # t1's time
    assert resync.tickers == set()  # the ticker channel still carries every market's activity
    lost = [trade("t2", A, at(1)), trade("t3", B, at(2)), trade("elsewhere", "KXOTHER", at(2))]
    items = live.apply_resync(resync, [], lost, at(3))
    refetched = [i for i in items if isinstance(i, types_pb2.Trade)]
    assert [t.trade_id for t in refetched] == ["t2", "t3"]  # only the subscription's markets
    (recovered,) = gaps(items)
    assert recovered.recovered
    assert recovered.expected_sequence == gap.expected_sequence


def test_a_rest_read_older_than_the_socket_cannot_repair_a_market_and_is_read_again() -> None:
    live = session(A, B)
    live.handle(book_frame(1, B), at(0))
    (gap,) = gaps(live.handle(ticker_frame(2, A, at(1)), at(1)))
    resync = live.take_resync()
    assert resync is not None
    # While REST is read, B moves on the socket (a book-only instant it cannot show yet).
    live.handle(delta_frame(2, B, at(5), "0.4100", "1.00"), at(5))
    items = live.apply_resync(resync, [rest_market(A, at(3)), rest_market(B, at(3))], [], at(6))
    # REST at 3 s is newer than A's last instant but older than B's: only A is repaired.
    assert [(s.ticker, time_of(s)) for s in snapshots(items)] == [(A, at(3))]
    assert gaps(items) == []
    again = live.take_resync()
    assert again is not None
    assert again.tickers == {B}
    assert list(again.gaps) == [gap]
    items = live.apply_resync(again, [rest_market(B, at(7))], [], at(8))
    assert [time_of(s) for s in snapshots(items)] == [at(7)]
    assert [g.recovered for g in gaps(items)] == [True]


def test_a_lifecycle_gap_holds_every_snapshot_back_until_rest_shows_the_status() -> None:
    live = session(A)
    live.handle(frame("market_lifecycle_v2", LIFECYCLE_SID, 1, market_ticker=A), at(0))
    live.handle(frame("market_lifecycle_v2", LIFECYCLE_SID, 3, market_ticker=A), at(1))
    assert snapshots(live.handle(ticker_frame(1, A, at(2)), at(2))) == []
    resync = live.take_resync()
    assert resync is not None
    assert resync.tickers == {A}
    items = live.apply_resync(resync, [rest_market(A, at(3), status="closed")], [], at(4))
    (rest_a,) = snapshots(items)
    assert rest_a.status == types_pb2.MARKET_STATUS_CLOSED
    (after,) = snapshots(live.handle(ticker_frame(2, A, at(5)), at(5)))
    assert after.status == types_pb2.MARKET_STATUS_CLOSED


def test_a_top_that_moves_without_its_ticker_frame_is_read_over_rest() -> None:
    live = session(A, B)
    live.handle(book_frame(1, A), at(0))
    live.handle(delta_frame(2, A, at(1), "0.4300", "4.00"), at(1))  # a better YES bid
    # The next instant completes this one; its ticker frame never came, so it is not shown.
    items = live.handle(ticker_frame(1, B, at(2)), at(2))
    assert [s.ticker for s in snapshots(items)] == [B]
    resync = live.take_resync()
    assert resync is not None
    assert resync.tickers == {A}


def test_a_market_never_read_over_rest_is_read_before_it_is_shown() -> None:
    live = session(A, seeded=False)
    assert snapshots(live.handle(ticker_frame(1, A, at(1)), at(1))) == []
    resync = live.take_resync()
    assert resync is not None
    assert resync.tickers == {A}
    (shown,) = snapshots(live.apply_resync(resync, [rest_market(A, at(1))], [], at(2)))
    assert shown.status == types_pb2.MARKET_STATUS_OPEN


def test_instants_are_shown_once_a_later_instant_of_any_market_arrives() -> None:
    live = session(A, B)
    live.handle(book_frame(1, A), at(0))
    live.handle(book_frame(2, B), at(0))

    def shown(items: list[FeedItem]) -> list[tuple[str, datetime]]:
        return sorted((s.ticker, s.exchange_time.ToDatetime(tzinfo=UTC)) for s in snapshots(items))

    # book-only changes below the top: each market's instant waits for a later one
    assert shown(live.handle(delta_frame(3, A, at(1), "0.4100", "1.00"), at(1))) == []
    assert shown(live.handle(delta_frame(4, B, at(1), "0.4100", "1.00"), at(1))) == []
    assert shown(live.handle(delta_frame(5, A, at(2), "0.4100", "1.00"), at(2))) == [
        (A, at(1)),
        (B, at(1)),
    ]
    assert shown(live.handle(delta_frame(6, B, at(2), "0.4100", "1.00"), at(2))) == []
    assert shown(live.handle(delta_frame(7, B, at(3), "0.4100", "1.00"), at(3))) == [
        (A, at(2)),
        (B, at(2)),
    ]


def book_records(
    items: list[FeedItem],
) -> list[BookChange | ingest_service_pb2.OrderBookCheckpoint]:
    return [i for i in items if isinstance(i, BookChange | ingest_service_pb2.OrderBookCheckpoint)]


def test_a_book_is_recorded_from_the_frame_after_it_then_change_by_change() -> None:
    live = session(A)
    assert book_records(live.handle(book_frame(1, A), at(0.5))) == []  # not placed in time yet
    items = live.handle(delta_frame(2, A, at(1), "0.4200", "-4.00"), at(1))
    start, change = book_records(items)
    assert isinstance(start, ingest_service_pb2.OrderBookCheckpoint)
    assert start.kind == ingest_service_pb2.ORDER_BOOK_CHECKPOINT_KIND_START
    # just before the first timed frame after it, holding the book as the exchange sent it
    assert start.book.exchange_time.ToDatetime(tzinfo=UTC) == at(1) - timedelta(microseconds=1)
    assert [(lv.price.ten_thousandths, lv.size.hundredths) for lv in start.book.yes_bids] == [
        (4200, 1000),
        (4100, 500),
    ]
    assert start.book.exchange_sequence == 1
    # the change carries the level's new size, not the delta
    assert change == BookChange(A, micros(at(1)), micros(at(1)), 2, types_pb2.SIDE_YES, 4200, 600)


def test_a_delta_of_another_shape_is_read_through_the_model_and_a_bad_one_refused() -> None:
    """The usual shape is read directly; anything else goes through the model: a time sent as
    a numeric string and a price with trailing zeros still give the same change, a price that
    is not a number is refused (counted, the book asked for again), never stored."""
    changes = []
    for price, ts_ms in (("0.4200", None), ("0.420000", "string")):
        live = session(A)
        live.handle(book_frame(1, A), at(0.5))
        delta = delta_frame(2, A, at(1), price, "-4.00")
        if ts_ms == "string":
            delta["msg"]["ts_ms"] = str(delta["msg"]["ts_ms"])
        changes += [i for i in book_records(live.handle(delta, at(1))) if isinstance(i, BookChange)]
    assert changes[0] == changes[1]
    assert changes[0] == BookChange(
        A, micros(at(1)), micros(at(1)), 2, types_pb2.SIDE_YES, 4200, 600
    )
    live = session(A)
    live.handle(book_frame(1, A), at(0.5))
    items = live.handle(delta_frame(2, A, at(1), "forty", "-4.00"), at(1))
    assert not [i for i in items if isinstance(i, BookChange)]
    assert live.stats.bad_frames == 1


def test_a_book_gap_marks_the_book_lost_and_asks_for_it_by_market() -> None:
    live = session(A, B)
    live.handle(book_frame(1, A), at(0.5))
    live.handle(delta_frame(2, A, at(1), "0.4200", "-4.00"), at(1))
    live.outbox.clear()
    items = live.handle(delta_frame(4, A, at(2), "0.4100", "1.00"), at(2))
    (lost,) = book_records(items)  # the change after the gap is not recorded
    assert isinstance(lost, ingest_service_pb2.OrderBookCheckpoint)
    assert lost.kind == ingest_service_pb2.ORDER_BOOK_CHECKPOINT_KIND_LOST
    # the lost frame came after the last change received on the sid
    assert lost.book.exchange_time.ToDatetime(tzinfo=UTC) == at(1)
    assert live.outbox == [
        {
            "id": live.next_id - 1,
            "cmd": "update_subscription",
            "params": {"sids": [BOOK_SID], "market_tickers": [A, B], "action": "get_snapshot"},
        }
    ]
    live.handle(book_frame(5, A), at(2.5))
    (resync,) = book_records(live.handle(ticker_frame(1, A, at(3)), at(3)))
    assert isinstance(resync, ingest_service_pb2.OrderBookCheckpoint)
    assert resync.kind == ingest_service_pb2.ORDER_BOOK_CHECKPOINT_KIND_RESYNC


def test_periodic_checkpoints_come_between_instants() -> None:
    live = session(A)
    live.checkpoints = CheckpointPolicy(every_changes=2, every_seconds=3600)
    live.handle(book_frame(1, A), at(0.5))
    records: list[BookChange | ingest_service_pb2.OrderBookCheckpoint] = []
    for seq, (when, delta) in enumerate([(1, "1.00"), (1, "1.00"), (1, "1.00"), (2, "1.00")], 2):
        records += book_records(live.handle(delta_frame(seq, A, at(when), "0.4200", delta), at(2)))
    kinds = [
        r.kind if isinstance(r, ingest_service_pb2.OrderBookCheckpoint) else "change"
        for r in records
    ]
    periodic = ingest_service_pb2.ORDER_BOOK_CHECKPOINT_KIND_PERIODIC
    # three changes of one instant, then the checkpoint, then the next instant's change
    assert kinds[1:] == ["change", "change", "change", periodic, "change"]
    checkpoint = records[4]
    assert isinstance(checkpoint, ingest_service_pb2.OrderBookCheckpoint)
    assert checkpoint.book.exchange_time.ToDatetime(tzinfo=UTC) == at(1)
    assert checkpoint.book.yes_bids[0].size.hundredths == 1300


def test_dropping_the_last_awaited_market_closes_the_book_gap_as_it_leaves() -> None:
    live = session(A, B)
    live.handle(book_frame(1, A), at(0.5))
    live.handle(book_frame(2, B), at(0.6))
    live.handle(delta_frame(3, A, at(1), "0.4200", "-4.00"), at(1))
    (gap,) = gaps(live.handle(delta_frame(5, A, at(2), "0.4100", "1.00"), at(2)))
    assert not gap.recovered
    assert gaps(live.handle(book_frame(6, A), at(2.5))) == []  # B's book is still awaited
    # B finalized and is dropped: its snapshot never comes, and the gap must not wait for it
    items = live.update_markets({}, [B])
    (recovered,) = gaps(items)
    assert recovered.recovered
    assert (recovered.subscription_id, recovered.expected_sequence) == (BOOK_SID, 4)
    assert not live.awaiting_books
    # closed once: a later book does not recover it again
    assert gaps(live.handle(book_frame(7, A), at(3))) == []


def test_dropping_a_market_keeps_the_book_gap_open_while_others_are_awaited() -> None:
    live = session(A, B)
    live.handle(book_frame(1, A), at(0.5))
    live.handle(delta_frame(2, A, at(1), "0.4200", "-4.00"), at(1))
    live.handle(delta_frame(4, A, at(2), "0.4100", "1.00"), at(2))
    assert gaps(live.update_markets({}, [B])) == []  # A's book is still awaited
    (recovered,) = gaps(live.handle(book_frame(5, A), at(2.5)))
    assert recovered.recovered
