"""The compiled decoder of the usual frames (kalshi/frames.py) against the general way.

Every frame text goes through the ingest's path (``LiveSession.handle_text``: msgspec for
``orderbook_delta`` and ``ticker`` frames of the usual shape, ``json.loads`` +
``LiveSession.handle`` for any other) and, on a twin session, through ``json.loads`` +
``LiveSession.handle`` alone. Both must hand out the same items, count the same bad frames, ask
for the same commands and REST reads, and end with the same books — for well-formed frames and
for hostile ones: odd types, missing fields, huge numbers, NUL characters, sub-penny prices,
fractional sizes, text that is not JSON. Hostile values that made both ways raise (a ``seq``
beyond int64, ``sid: true``, a list as the ticker, a ``ts_ms`` beyond what a datetime holds)
are now refused as bad frames.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kfeed_ingest.kalshi.books import BookChange
from kfeed_ingest.kalshi.frames import BookDeltaFrame, TickerFrame, decode_usual_frame
from kfeed_ingest.kalshi.session import FeedItem, LiveSession
from tests.ingest.test_live_session import BOOK_SID, TICKER_SID, A, B, at, book_frame, session

_NOW = at(1)
_TS_MS = int(_NOW.timestamp() * 1000)

_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2, 3, 2**31, 2**63, 2**64, 10**20, -(10**20), 10**400,
    1.0, 2.5, -0.0, 1e308, "", "0", "1", "yes", "no", "0.42", "0.4200", "0.1234", "0.12345",
    "0.999999", "1.0000", "-0.0100", "1.5", "0.01", "-4.00", "3.00", "1e3", "NaN", " 0.42",
    "0.42\u0000", "\u0000", "KX\u0000", A, B, [], {}, ["0.42", "1.00"], {"a": 1},
]  # fmt: skip
_PRICES = ["0.4200", "0.4100", "0.1234", "0.12345", "0.42", "1.0000", "0.0000", "-0.0100", "x"]
_COUNTS = ["-4.00", "1.50", "0.01", "-0.01", "100.00", "1.555", "-999999999999.00", "4"]


def _delta_msg(draw: st.DrawFn) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "market_ticker": draw(st.sampled_from([A, B, A + "\u0000"])),
        "price_dollars": draw(st.sampled_from(_PRICES)),
        "delta_fp": draw(st.sampled_from(_COUNTS)),
        "side": draw(st.sampled_from(["yes", "no", "YES", ""])),
        "ts_ms": _TS_MS + draw(st.integers(0, 3)),
    }
    return msg


def _ticker_msg(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "market_ticker": draw(st.sampled_from([A, B])),
        "price_dollars": draw(st.sampled_from(_PRICES)),
        "yes_bid_dollars": "0.4200",
        "yes_ask_dollars": draw(st.sampled_from(["0.4600", "0.12345", "0.4601"])),
        "yes_bid_size_fp": draw(st.sampled_from(["10.00", "1.5", "0.01"])),
        "yes_ask_size_fp": "20.00",
        "volume_fp": draw(st.sampled_from(["100.00", "100.5", "-1.00"])),
        "open_interest_fp": "50.00",
        "ts_ms": _TS_MS + draw(st.integers(0, 3)),
    }


@st.composite
def frame_texts(draw: st.DrawFn) -> str:
    """A delta or ticker frame, usually with one field (of the frame or its msg) made odd:
    another value or type, or missing; sometimes a field added or the text itself broken."""
    kind = draw(st.sampled_from(["orderbook_delta", "ticker"]))
    sid = BOOK_SID if kind == "orderbook_delta" else TICKER_SID
    msg = _delta_msg(draw) if kind == "orderbook_delta" else _ticker_msg(draw)
    frame: dict[str, Any] = {"type": kind, "sid": sid, "seq": draw(st.integers(2, 4)), "msg": msg}
    for _ in range(draw(st.integers(0, 2))):
        target = draw(st.sampled_from([frame, msg]))
        key = draw(st.sampled_from([*target, "extra", "ts", "price", "yes_bid", "volume"]))
        if draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = draw(st.sampled_from(_VALUES))
    text = json.dumps(frame, allow_nan=True)
    mangle = draw(st.sampled_from(["", "", "", "truncate", "trailing", "duplicate", "nan"]))
    if mangle == "truncate":
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif mangle == "trailing":
        text += draw(st.sampled_from([" ", "x", "{}", "\u0000"]))
    elif mangle == "duplicate":  # a repeated key: JSON's last one wins, in both ways
        text = text[:-1] + f',"seq":{draw(st.integers(-1, 5))}}}'
    elif mangle == "nan":
        text = text.replace(f'"ts_ms": {msg.get("ts_ms")}', '"ts_ms": NaN')
    return text


def _reference(live: LiveSession, raw: str) -> list[FeedItem]:
    """The general way alone (what the client did with a frame before the compiled decoder)."""
    try:
        frame = json.loads(raw)
    except ValueError:
        live.stats.bad_frames += 1
        return []
    if not isinstance(frame, dict):
        return []
    return live.handle(frame, _NOW)


def _state(live: LiveSession) -> Any:
    markets = {
        ticker: (m.yes, m.no, m.recording, m.quote, m.volume, m.exchange_time)
        for ticker, m in live.markets.items()
    }
    resync = None if live.resync is None else (live.resync.tickers, len(live.resync.gaps))
    return live.stats, live.outbox, markets, resync, live.awaiting_books


def _pair() -> tuple[LiveSession, LiveSession]:
    """Two equal sessions whose books of A and B are being recorded."""
    pair = []
    for _ in range(2):
        live = session(A, B)
        live.handle(book_frame(1, A), at(0.5))
        snapshot_of_b = book_frame(2, B)
        live.handle(snapshot_of_b, at(0.5))
        pair.append(live)
    return pair[0], pair[1]


@settings(max_examples=400, deadline=None)
@given(st.lists(frame_texts(), min_size=1, max_size=6))
def test_hostile_and_usual_frames_are_handled_the_same_as_by_the_general_way(
    texts: list[str],
) -> None:
    fast, reference = _pair()
    for raw in texts:
        assert fast.handle_text(raw, _NOW) == _reference(reference, raw), raw
        assert _state(fast) == _state(reference), raw


def test_the_usual_shapes_are_decoded_and_others_left_to_the_general_way() -> None:
    delta = (
        '{"type":"orderbook_delta","sid":3,"seq":2,"msg":{"market_ticker":"A",'
        '"price_dollars":"0.1234","delta_fp":"-1.50","side":"no","ts_ms":5,"new":1}}'
    )
    decoded = decode_usual_frame(delta)
    assert isinstance(decoded, BookDeltaFrame)
    assert (decoded.sid, decoded.seq, decoded.msg.price_dollars, decoded.msg.delta_fp) == (
        3, 2, "0.1234", "-1.50",
    )  # fmt: skip
    ticker = '{"type":"ticker","sid":1,"seq":9,"msg":{"market_ticker":"A","ts_ms":5}}'
    assert isinstance(decode_usual_frame(ticker), TickerFrame)
    for other in (
        delta.replace('"seq":2', '"seq":2.0'),  # a float where an integer belongs
        delta.replace('"seq":2', '"seq":true'),
        delta.replace('"ts_ms":5', '"ts_ms":"5"'),  # coerced by the model, not here
        delta.replace('"price_dollars":"0.1234",', ""),  # missing
        delta.replace("orderbook_delta", "orderbook_snapshot"),
        delta[:-1],  # not JSON
        '{"type":"subscribed","msg":{"channel":"ticker","sid":1}}',
        "[]",
    ):
        assert decode_usual_frame(other) is None, other


def test_a_sequence_number_int64_cannot_hold_is_a_bad_frame_not_a_crash() -> None:
    """A ``seq`` of 2**63 or more once made the ingest raise recording the gap (FeedGap holds
    int64): now it is refused like any frame in an unexpected shape, both ways."""
    for seq, sid in ((2**63, BOOK_SID), (10**400, BOOK_SID), (-(2**63) - 1, BOOK_SID), (2, 2**64)):
        fast, reference = _pair()
        raw = json.dumps(
            {
                "type": "orderbook_delta", "sid": sid, "seq": seq,
                "msg": {"market_ticker": A, "price_dollars": "0.4200", "delta_fp": "1.00",
                        "side": "yes", "ts_ms": _TS_MS},
            }
        )  # fmt: skip
        assert fast.handle_text(raw, _NOW) == _reference(reference, raw)
        assert _state(fast) == _state(reference)
        assert fast.stats.bad_frames == 1
        assert fast.awaiting_books == ({A} if sid == BOOK_SID else set())


def test_a_time_no_datetime_holds_is_a_bad_frame_not_a_crash() -> None:
    """Kalshi sending ``ts_ms`` = 10**20 once made the ingest raise OverflowError."""
    fast, _ = _pair()
    for ts_ms in (10**20, -(10**15)):
        raw = json.dumps(
            {
                "type": "orderbook_delta", "sid": BOOK_SID, "seq": 3 if ts_ms > 0 else 4,
                "msg": {"market_ticker": A, "price_dollars": "0.4200", "delta_fp": "1.00",
                        "side": "yes", "ts_ms": ts_ms},
            }
        )  # fmt: skip
        items = fast.handle_text(raw, _NOW)
        assert not [i for i in items if isinstance(i, BookChange)]
    assert fast.stats.bad_frames == 2
    assert fast.awaiting_books == {A}  # its book is asked for again


def test_a_ticker_frame_is_read_the_same_way() -> None:
    fast, reference = _pair()
    raw = json.dumps(
        {"type": "ticker", "sid": TICKER_SID, "seq": 2, "msg": {
            "market_ticker": A, "price_dollars": "0.4400", "yes_bid_dollars": "0.4200",
            "yes_ask_dollars": "0.4600", "yes_bid_size_fp": "10.00", "yes_ask_size_fp": "20.00",
            "volume_fp": "100.50", "open_interest_fp": "50.00",
            "ts_ms": int(datetime(2026, 3, 1, 12, 0, 1, tzinfo=UTC).timestamp() * 1000)}}
    )  # fmt: skip
    assert fast.handle_text(raw, _NOW) == _reference(reference, raw)
    assert _state(fast) == _state(reference)
    assert fast.markets[A].volume == 10050
