"""The WebSocket API at ``/trade-api/ws/v2``: signed handshake, commands, channels, sid/seq."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from kfeed_sim.auth import Verifier
from kfeed_sim.faults import FaultInjector
from kfeed_sim.market_model import Exchange, StepEvents
from kfeed_sim.shapes import JSON, Renderer

WS_PATH = "/trade-api/ws/v2"
CHANNELS = ("ticker", "trade", "orderbook_delta", "market_lifecycle_v2")
NEEDS_TICKERS = frozenset({"orderbook_delta"})


class CommandError(Exception):
    """A command failed: answered with ``{"type": "error", "msg": {"code", "msg"}}``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


# Kalshi's documented WebSocket error codes
UNPROCESSABLE = CommandError(1, "Unable to process message")
PARAMS_REQUIRED = CommandError(2, "Params required")
CHANNELS_REQUIRED = CommandError(3, "Channels required")
SIDS_REQUIRED = CommandError(4, "Subscription IDs required")
UNKNOWN_COMMAND = CommandError(5, "Unknown command")
# 6 "Already subscribed" is documented but no longer sent (see _resubscribe)
UNKNOWN_SID = CommandError(7, "Unknown subscription ID")
UNKNOWN_CHANNEL = CommandError(8, "Unknown channel name")
INVALID_PARAMETER = CommandError(11, "Invalid parameter")
ONE_SID_REQUIRED = CommandError(12, "Exactly one subscription ID is required")
UNSUPPORTED_ACTION = CommandError(13, "Unsupported action")
TICKER_REQUIRED = CommandError(14, "Market Ticker required")
ACTION_REQUIRED = CommandError(15, "Action required")
MARKET_NOT_FOUND = CommandError(16, "Market not found")


@dataclass
class Subscription:
    """One ``sid``: a channel over some markets (``None`` = all) with its own ``seq``."""

    sid: int
    channel: str
    tickers: set[str] | None
    seq: int = 0

    def covers(self, ticker: str) -> bool:
        """Does this subscription carry messages about ``ticker``?"""
        return self.tickers is None or ticker in self.tickers


def encode(value: Any) -> str:
    """Compact JSON, as every frame goes out."""
    return json.dumps(value, separators=(",", ":"))


def _encoded(render: Callable[..., JSON], *args: Any) -> str:
    return encode(render(*args))


def data_frame(kind: str, sid: int, seq: int, encoded_msg: str) -> str:
    """``{"type":…,"sid":…,"seq":…,"msg":…}`` around a ``msg`` encoded once for all sockets
    (the same text as :func:`encode` of the whole frame)."""
    return f'{_frame_start(kind)}{sid},"seq":{seq},"msg":{encoded_msg}}}'


@lru_cache(maxsize=64)
def _frame_start(kind: str) -> str:
    """``{"type":KIND,"sid":`` (a handful of kinds)."""
    return f'{{"type":{encode(kind)},"sid":'


@dataclass
class Connection:
    """One client socket: its subscriptions and its outgoing queue (bounded) of encoded frames,
    each with whether it is a data frame (one with ``seq``)."""

    websocket: WebSocket
    outbox: asyncio.Queue[tuple[str, bool]]
    subscriptions: dict[int, Subscription] = field(default_factory=dict)
    next_sid: int = 1
    data_frames_sent: int = 0
    overflowed: bool = False

    def send(self, frame: JSON) -> None:
        """Queue a command reply (not a data frame)."""
        self.send_text(encode(frame), is_data=False)

    def send_text(self, text: str, is_data: bool) -> None:
        """Queue an encoded frame; a reader too slow to keep up is disconnected rather than
        stalling us."""
        try:
            self.outbox.put_nowait((text, is_data))
        except asyncio.QueueFull:
            self.overflowed = True


class WebSocketHub:
    """Accepts sockets, runs their commands and fans every step's events out to them."""

    def __init__(
        self,
        exchange: Exchange,
        renderer: Renderer,
        faults: FaultInjector,
        verifier: Verifier,
        queue_size: int,
    ) -> None:
        self.exchange = exchange
        self.render = renderer
        self.faults = faults
        self.verifier = verifier
        self.queue_size = queue_size
        self.connections: list[Connection] = []
        self.accepted = 0  # sockets accepted since start (a client that reconnects adds one)

    # -- the socket ----------------------------------------------------------------------------

    async def endpoint(self, websocket: WebSocket) -> None:
        """Starlette endpoint: verify the signed handshake, then serve commands and frames."""
        failure = self.verifier.failure(websocket.headers, "GET", WS_PATH)
        if failure is not None:
            body = {"error": {"code": "authentication_error", "message": failure}}
            await websocket.send_denial_response(JSONResponse(body, status_code=401))
            return
        if self.faults.config.refuse_sockets:
            body = {"error": {"code": "service_unavailable", "message": "try again later"}}
            await websocket.send_denial_response(JSONResponse(body, status_code=503))
            return
        await websocket.accept()
        self.accepted += 1
        connection = Connection(websocket, asyncio.Queue(self.queue_size))
        self.connections.append(connection)
        writer = asyncio.create_task(self._write(connection))
        try:
            while not writer.done():
                text = await websocket.receive_text()
                self._handle(connection, text)
        except WebSocketDisconnect:
            pass
        finally:
            self.connections.remove(connection)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _write(self, connection: Connection) -> None:
        websocket = connection.websocket
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            while True:
                text, is_data = await connection.outbox.get()
                if connection.overflowed or (
                    is_data and self.faults.drop_socket(connection.data_frames_sent)
                ):
                    await websocket.close(code=1011)
                    return
                await websocket.send_text(text)
                connection.data_frames_sent += is_data

    # -- commands ------------------------------------------------------------------------------

    def _handle(self, connection: Connection, text: str) -> None:
        command_id: Any = None
        try:
            try:
                command = json.loads(text)
            except ValueError:
                raise UNPROCESSABLE from None
            if not isinstance(command, dict):
                raise UNPROCESSABLE
            command_id = command.get("id")
            params = command.get("params")
            handler = {
                "subscribe": self._subscribe,
                "unsubscribe": self._unsubscribe,
                "update_subscription": self._update_subscription,
            }.get(str(command.get("cmd")))
            if handler is None:
                raise UNKNOWN_COMMAND
            if not isinstance(params, dict):
                raise PARAMS_REQUIRED
            handler(connection, command_id, params)
        except CommandError as error:
            connection.send(
                {
                    "id": command_id,
                    "type": "error",
                    "msg": {"code": error.code, "msg": error.message},
                }
            )

    def _tickers_param(self, params: dict[str, Any]) -> set[str] | None:
        raw = params.get("market_tickers")
        if raw is None and "market_ticker" in params:
            raw = [params["market_ticker"]]
        if raw is None:
            return None
        if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
            raise INVALID_PARAMETER
        unknown = [t for t in raw if t not in self.exchange.markets]
        if unknown:
            raise CommandError(MARKET_NOT_FOUND.code, f"Market not found: {', '.join(unknown)}")
        return set(raw)

    def _subscribe(self, connection: Connection, command_id: Any, params: dict[str, Any]) -> None:
        channels = params.get("channels")
        if not channels or not isinstance(channels, list):
            raise CHANNELS_REQUIRED
        if any(channel not in CHANNELS for channel in channels):
            raise UNKNOWN_CHANNEL
        tickers = self._tickers_param(params)
        if tickers is None and NEEDS_TICKERS & set(channels):
            raise TICKER_REQUIRED
        for channel in channels:
            existing = next(
                (s for s in connection.subscriptions.values() if s.channel == channel), None
            )
            if existing is not None:
                self._resubscribe(connection, command_id, existing, tickers)
                continue
            subscription = Subscription(connection.next_sid, channel, tickers)
            connection.next_sid += 1
            connection.subscriptions[subscription.sid] = subscription
            connection.send(
                {
                    "id": command_id,
                    "type": "subscribed",
                    "msg": {"channel": channel, "sid": subscription.sid},
                }
            )
            if channel == "orderbook_delta":
                self._send_snapshots(connection, subscription, sorted(tickers or ()))

    def _resubscribe(
        self,
        connection: Connection,
        command_id: Any,
        subscription: Subscription,
        tickers: set[str] | None,
    ) -> None:
        """Subscribing again to a subscribed channel: a no-op since 2025-10-01 except that new
        tickers join the subscription (with their books on the order-book channel). It does not
        send a fresh book of the markets already subscribed; error 6 is no longer sent. The reply
        (not documented) is an ``ok`` with the subscription's sid and markets."""
        added: list[str] = []
        if subscription.tickers is not None:
            if tickers is None:
                added = sorted(set(self.exchange.markets) - subscription.tickers)
                subscription.tickers = None
            else:
                added = sorted(tickers - subscription.tickers)
                subscription.tickers |= tickers
        connection.send(
            {
                "id": command_id,
                "sid": subscription.sid,
                "type": "ok",
                "msg": {"market_tickers": sorted(subscription.tickers or ())},
            }
        )
        if subscription.channel == "orderbook_delta":
            self._send_snapshots(connection, subscription, added)

    def _sids_param(self, connection: Connection, params: dict[str, Any]) -> list[Subscription]:
        sids = params.get("sids")
        if sids is None and "sid" in params:
            sids = [params["sid"]]
        if not sids or not isinstance(sids, list):
            raise SIDS_REQUIRED
        if any(sid not in connection.subscriptions for sid in sids):
            raise UNKNOWN_SID
        return [connection.subscriptions[sid] for sid in sids]

    def _unsubscribe(self, connection: Connection, command_id: Any, params: dict[str, Any]) -> None:
        for subscription in self._sids_param(connection, params):
            del connection.subscriptions[subscription.sid]
            connection.send({"id": command_id, "sid": subscription.sid, "type": "unsubscribed"})

    def _update_subscription(
        self, connection: Connection, command_id: Any, params: dict[str, Any]
    ) -> None:
        subscriptions = self._sids_param(connection, params)
        if len(subscriptions) != 1:
            raise ONE_SID_REQUIRED
        subscription = subscriptions[0]
        action = params.get("action")
        if not action:
            raise ACTION_REQUIRED
        if action not in ("add_markets", "delete_markets", "get_snapshot"):
            raise UNSUPPORTED_ACTION
        tickers = self._tickers_param(params)
        snapshot_tickers: Iterable[str] = ()
        if action == "get_snapshot":
            # order-book channel only, and it names the markets to refresh (since 2026-04-20)
            if subscription.channel != "orderbook_delta":
                raise UNSUPPORTED_ACTION
            if tickers is None:
                raise TICKER_REQUIRED
            if subscription.tickers is not None and not tickers <= subscription.tickers:
                raise INVALID_PARAMETER
            snapshot_tickers = [] if self.faults.config.withhold_snapshots else sorted(tickers)
        elif tickers is None:
            raise TICKER_REQUIRED
        elif subscription.tickers is None:
            raise INVALID_PARAMETER  # an all-markets subscription has no list to edit
        elif action == "add_markets":
            snapshot_tickers = sorted(tickers - subscription.tickers)
            subscription.tickers |= tickers
        else:
            subscription.tickers -= tickers
        connection.send(
            {
                "id": command_id,
                "sid": subscription.sid,
                "type": "ok",
                "msg": {"market_tickers": sorted(subscription.tickers or ())},
            }
        )
        if subscription.channel == "orderbook_delta":
            self._send_snapshots(connection, subscription, snapshot_tickers)

    # -- data ----------------------------------------------------------------------------------

    def _send_data(
        self, connection: Connection, subscription: Subscription, kind: str, encoded_msg: str
    ) -> None:
        subscription.seq += 1
        if self.faults.lose_frame():
            return  # the seq number is spent: the client sees a gap
        connection.send_text(
            data_frame(kind, subscription.sid, subscription.seq, encoded_msg), is_data=True
        )

    def _send_snapshots(
        self, connection: Connection, subscription: Subscription, tickers: Iterable[str]
    ) -> None:
        for ticker in tickers:
            msg = self.render.orderbook_snapshot_msg(self.exchange.markets[ticker])
            self._send_data(connection, subscription, "orderbook_snapshot", encode(msg))

    def publish(self, events: StepEvents) -> None:
        """Fan one step's events out to every matching subscription, in step order.

        A message is rendered and encoded once, and only if some subscription carries it; the
        frames of different subscriptions then differ only in ``sid`` and ``seq``.
        """
        wanted = {s.channel for c in self.connections for s in c.subscriptions.values()}
        if not wanted:
            return
        markets, render = self.exchange.markets, self.render
        # (channel, ticker, what renders the encoded msg)
        messages: list[tuple[str, str, Callable[[], str]]] = []
        if "market_lifecycle_v2" in wanted:
            messages += [
                (
                    "market_lifecycle_v2",
                    e.ticker,
                    partial(_encoded, render.lifecycle_msg, e, markets[e.ticker]),
                )
                for e in events.lifecycle
            ]
        if "orderbook_delta" in wanted:
            delta_text = render.orderbook_delta_text
            messages += [
                ("orderbook_delta", d.ticker, partial(delta_text, d)) for d in events.book_deltas
            ]
        if "trade" in wanted:
            messages += [
                ("trade", t.ticker, partial(_encoded, render.trade_msg, t)) for t in events.trades
            ]
        if "ticker" in wanted:
            messages += [
                ("ticker", ticker, partial(_encoded, render.ticker_msg, ticker, state))
                for ticker, state in zip(events.ticker_markets, events.tickers, strict=True)
            ]
        encoded: list[str | None] = [None] * len(messages)
        for connection in self.connections:
            # each channel's subscriptions, in the order they were made
            by_channel: dict[str, list[Subscription]] = {}
            for subscription in connection.subscriptions.values():
                by_channel.setdefault(subscription.channel, []).append(subscription)
            for index, (channel, ticker, render_msg) in enumerate(messages):
                for subscription in by_channel.get(channel, ()):
                    if subscription.covers(ticker):
                        text = encoded[index]
                        if text is None:
                            text = encoded[index] = render_msg()
                        self._send_data(connection, subscription, channel, text)
