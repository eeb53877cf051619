"""The two WebSocket frames that make up almost all of a busy feed, decoded by a compiled decoder.

Nearly every frame of a busy order-book feed is an ``orderbook_delta`` (one per book change) or a
``ticker`` frame. :func:`decode_usual_frame` decodes such a frame straight from its text into
typed structs with msgspec (docs/adr/0019-compiled-frame-decoding.md), several times cheaper
than ``json.loads`` and reading the dict field by field. It is strict: exact JSON types (an
integer ``seq``, not ``2.0`` or ``true``; a string price), no coercion. Anything else — other
frame types, odd types, missing fields, text that is not JSON — gives None, and the frame goes
the general way (``json.loads`` and :meth:`LiveSession.handle`), which decides exactly as it
always has: what the strict decoder accepts, the general way reads the same.
"""

from __future__ import annotations

import msgspec


class BookDeltaMsg(msgspec.Struct, frozen=True):
    """``orderbook_delta`` ``msg`` (see ../shared/kalshi-api.md)."""

    market_ticker: str
    price_dollars: str
    delta_fp: str
    side: str
    ts_ms: int | None = None


class TickerMsg(msgspec.Struct, frozen=True):
    """``ticker`` ``msg``: the dollar/fp strings, and the removed integer fields as fallbacks."""

    market_ticker: str
    price_dollars: str | None = None
    yes_bid_dollars: str | None = None
    yes_ask_dollars: str | None = None
    yes_bid_size_fp: str | None = None
    yes_ask_size_fp: str | None = None
    volume_fp: str | None = None
    open_interest_fp: str | None = None
    ts_ms: int | None = None
    ts: int | None = None
    price: int | None = None
    yes_bid: int | None = None
    yes_ask: int | None = None
    volume: int | None = None
    open_interest: int | None = None


class BookDeltaFrame(msgspec.Struct, frozen=True, tag_field="type", tag="orderbook_delta"):
    """``{"type": "orderbook_delta", "sid", "seq", "msg"}``."""

    sid: int
    seq: int
    msg: BookDeltaMsg


class TickerFrame(msgspec.Struct, frozen=True, tag_field="type", tag="ticker"):
    """``{"type": "ticker", "sid", "seq", "msg"}``."""

    sid: int
    seq: int
    msg: TickerMsg


UsualFrame = BookDeltaFrame | TickerFrame

_DECODER = msgspec.json.Decoder(UsualFrame)


def decode_usual_frame(raw: str | bytes) -> UsualFrame | None:
    """``raw`` as a delta or ticker frame of the usual shape, or None for any other frame."""
    try:
        return _DECODER.decode(raw)
    except msgspec.DecodeError:  # ValidationError is a DecodeError
        return None
