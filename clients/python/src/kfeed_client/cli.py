"""The client half of the `kfeed` command: `tail`, `markets`, `snapshots`, `candles` and `book`.

Installed as `kfeed-client <command>`; the root `kfeed` command dispatches the same commands
through :func:`run_tail`, :func:`run_markets`, :func:`run_snapshots` and :func:`run_candles`.
Every flag can also come from an environment variable ``KFEED_<FLAG>`` (``--server`` →
``KFEED_SERVER``, ``--ca-file`` → ``KFEED_CA_FILE``); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kfeed.v1 import market_service_pb2, types_pb2
from kfeed_client.books import Level, LocalOrderBook, LocalOrderBooks
from kfeed_client.client import KfeedClient, connect
from kfeed_client.connection import DEFAULT_ADDRESS, TlsConfig
from kfeed_client.money import contracts_to_decimal, dollars_to_decimal
from kfeed_client.streaming import DEFAULT_MAX_BATCH_SIZE

ENV_PREFIX = "KFEED_"
CONNECT_TIMEOUT = 5.0
_TRUE = {"1", "true", "yes", "on"}
_RELATIVE_TIME = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}

Command = Callable[[argparse.Namespace, Console], Awaitable[int]]


def env_name(flag: str) -> str:
    """The environment variable of a flag: ``--ca-file`` → ``KFEED_CA_FILE``."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def _add_option(parser: argparse.ArgumentParser, flag: str, help: str, **kwargs: Any) -> None:
    """A ``--flag VALUE`` option whose default comes from ``KFEED_<FLAG>``; its help names the
    built-in default and the variable."""
    variable = env_name(flag)
    built_in = kwargs.pop("default", None)
    default = os.environ.get(variable, built_in)
    shown = "" if built_in in (None, "") else f" (default: {built_in})"
    parser.add_argument(flag, default=default, help=f"{help}{shown} [env {variable}]", **kwargs)


def _add_switch(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A boolean ``--flag`` that ``KFEED_<FLAG>=1`` (or true/yes/on) also turns on."""
    variable = env_name(flag)
    default = os.environ.get(variable, "").strip().lower() in _TRUE
    parser.add_argument(flag, action="store_true", default=default, help=f"{help} [env {variable}]")


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO-8601 time (UTC when it names no zone), ``now``, or a span ago such as ``15m``.

    Spans take the units s, m, h and d: ``--from 2h`` means two hours ago.
    """
    text = text.strip()
    reference = now or datetime.now(UTC)
    if text == "now":
        return reference
    relative = _RELATIVE_TIME.match(text)
    if relative:
        try:
            return reference - timedelta(seconds=float(relative[1]) * _UNIT_SECONDS[relative[2]])
        except OverflowError:
            raise argparse.ArgumentTypeError(f"{text!r} reaches before year 1") from None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO-8601 time nor a span like 30s, 15m, 2h, 1d"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


_INTERVAL = re.compile(r"^(\d+)([smhd]?)$")


def parse_interval(text: str) -> timedelta:
    """A candle interval: whole seconds, or a whole number of s, m, h or d (``90``, ``15m``,
    ``1h``, ``1d``)."""
    match = _INTERVAL.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an interval: a whole number of seconds or of s, m, h, d (15m, 1h)"
        )
    return timedelta(seconds=int(match[1]) * _UNIT_SECONDS[match[2] or "s"])


def _market_status(name: str) -> types_pb2.MarketStatus.ValueType:
    try:
        return types_pb2.MarketStatus.Value("MARKET_STATUS_" + name.upper())
    except ValueError:
        choices = [
            n.removeprefix("MARKET_STATUS_").lower()
            for n, number in types_pb2.MarketStatus.items()
            if number != types_pb2.MARKET_STATUS_UNSPECIFIED
        ]
        raise argparse.ArgumentTypeError(
            f"unknown status {name!r}; one of {', '.join(choices)}"
        ) from None


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 86_400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return seconds


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    _add_option(parser, "--server", "HOST:PORT of kfeed serve", default=DEFAULT_ADDRESS)
    _add_option(
        parser,
        "--connect-timeout",
        "seconds to wait for the server before giving up",
        default=CONNECT_TIMEOUT,
        type=_positive_seconds,
    )
    _add_option(parser, "--token", "bearer token sent as `authorization: Bearer …`")
    _add_switch(parser, "--tls", "use TLS with the system's root certificates")
    _add_option(parser, "--ca-file", "PEM CA bundle that verifies the server (implies TLS)")
    _add_option(parser, "--cert-file", "PEM client certificate for mutual TLS")
    _add_option(parser, "--key-file", "PEM private key of --cert-file")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    _add_switch(parser, "--json", "print one JSON object (protobuf JSON mapping) per line")


def build_parser(prog: str = "kfeed-client") -> argparse.ArgumentParser:
    """The parser of all three commands, as subcommands."""
    parser = CliParser(prog=prog, description="Query and watch a kfeed server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (configure, _, help_text) in COMMANDS.items():
        configure(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def _configure_tail(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tickers", nargs="*", metavar="TICKER", help="markets (none: all)")
    _add_option(parser, "--event", "markets of this event ticker")
    _add_option(parser, "--series", "markets of this series ticker")
    _add_option(
        parser,
        "--from",
        "replay from this time (ISO-8601, or a span ago: 15m)",
        dest="start",
        type=parse_time,
    )
    _add_option(parser, "--resume", "continue after this resume token from an earlier run")
    _add_switch(parser, "--include-latest", "start with each market's latest snapshot")
    _add_switch(parser, "--trades", "follow the public trades instead of snapshots")
    _add_switch(parser, "--book", "follow the order books (a ladder, then every change)")
    _add_option(
        parser,
        "--depth",
        "with --book: levels a side in the ladders shown (0: all)",
        default=10,
        type=int,
    )
    _add_option(parser, "--heartbeat", "seconds between heartbeats when idle", type=float)
    _add_option(parser, "--conflate", "at most one snapshot per market per N ms", type=int)
    _add_option(
        parser,
        "--limit",
        "exit after this many snapshots (trades with --trades, books and changes with --book)",
        type=int,
    )
    _add_switch(parser, "--verbose", "also show heartbeats")
    _add_output_options(parser)
    _add_connection_options(parser)


def _configure_markets(parser: argparse.ArgumentParser) -> None:
    _add_option(parser, "--event", "only markets of this event ticker", default="")
    _add_option(parser, "--series", "only markets of this series ticker", default="")
    parser.add_argument(
        "--status",
        action="append",
        type=_market_status,
        default=[],
        help="only markets in this status (repeatable): open, closed, …",
    )
    _add_output_options(parser)
    _add_connection_options(parser)


def _configure_snapshots(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ticker", metavar="TICKER", help="the market")
    _add_option(
        parser,
        "--from",
        "from this time (ISO-8601, or a span ago: 15m)",
        dest="start",
        type=parse_time,
    )
    _add_option(parser, "--to", "until this time (exclusive)", dest="end", type=parse_time)
    _add_option(parser, "--limit", "at most this many snapshots", type=int)
    _add_output_options(parser)
    _add_connection_options(parser)


def _configure_candles(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ticker", metavar="TICKER", help="the market")
    _add_option(
        parser,
        "--interval",
        "candle length: 1s to 1d, e.g. 30s, 15m, 1h, 1d",
        default="1h",
        type=parse_interval,
    )
    _add_option(
        parser,
        "--from",
        "first candle: the one containing this time (default: 24 intervals ago)",
        dest="start",
        type=parse_time,
    )
    _add_option(
        parser,
        "--to",
        "candles starting before this time (default: now)",
        dest="end",
        type=parse_time,
    )
    _add_output_options(parser)
    _add_connection_options(parser)


def _configure_book(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ticker", metavar="TICKER", help="the market")
    _add_option(
        parser,
        "--at",
        "the book in force at this time (ISO-8601, or a span ago: 15m; default: the latest)",
        dest="at",
        type=parse_time,
    )
    _add_option(parser, "--depth", "levels a side, best first (0: all)", default=10, type=int)
    _add_output_options(parser)
    _add_connection_options(parser)


def _configure_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "kind", choices=("snapshots", "trades", "book-changes"), help="what to export"
    )
    parser.add_argument("tickers", nargs="*", metavar="TICKER", help="markets (none: all)")
    _add_option(parser, "--event", "markets of this event ticker")
    _add_option(parser, "--series", "markets of this series ticker")
    _add_option(parser, "--from", "from this time (ISO-8601, or a span ago: 2d)", dest="start",
                type=parse_time)  # fmt: skip
    _add_option(parser, "--to", "until this time (exclusive)", dest="end", type=parse_time)
    parser.add_argument(
        "--format",
        choices=("parquet", "csv", "arrow"),
        help="file format (default: from the file's suffix, else parquet)",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="the file to write")
    _add_switch(parser, "--quiet", "no progress bar")
    _add_connection_options(parser)


def _connect(options: argparse.Namespace) -> KfeedClient:
    tls: TlsConfig | None = None
    if options.tls or options.ca_file or options.cert_file:
        tls = TlsConfig(
            ca_file=options.ca_file, cert_file=options.cert_file, key_file=options.key_file
        )
    return connect(options.server, token=options.token or None, tls=tls)


def _json(message: Message) -> str:
    return json_format.MessageToJson(message, indent=None)


def _time(stamp: timestamp_pb2.Timestamp) -> str:
    moment = stamp.ToDatetime(tzinfo=UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _dollars(value: types_pb2.Dollars) -> str:
    return f"{dollars_to_decimal(value):.4f}"


def _contracts(value: types_pb2.Contracts) -> str:
    return f"{contracts_to_decimal(value):,.2f}"


def _status(value: types_pb2.MarketStatus.ValueType) -> str:
    return types_pb2.MarketStatus.Name(value).removeprefix("MARKET_STATUS_").lower()


# Snapshot fields compared between consecutive rows of a market, and those a row shows anyway.
_COMPARED_FIELDS = (
    "yes_bid", "yes_ask", "no_bid", "no_ask", "yes_bid_size", "yes_ask_size", "last_price",
    "volume", "volume_24h", "open_interest", "liquidity", "status",
)  # fmt: skip
_SHOWN_FIELDS = {"yes_bid", "yes_ask", "no_bid", "no_ask", "last_price", "volume", "status"}
_CONTRACT_FIELDS = {"yes_bid_size", "yes_ask_size", "volume", "volume_24h", "open_interest"}
NO_QUOTE = "—"


def _field_value(snapshot: types_pb2.MarketSnapshot, name: str) -> int | None:
    if name == "status":
        return int(snapshot.status)
    if not snapshot.HasField(name):  # type: ignore[arg-type]
        return None
    value = getattr(snapshot, name)
    return int(value.hundredths if name in _CONTRACT_FIELDS else value.ten_thousandths)


def _field_text(snapshot: types_pb2.MarketSnapshot, name: str) -> str:
    if name == "status":
        return _status(snapshot.status)
    if not snapshot.HasField(name):  # type: ignore[arg-type]
        return NO_QUOTE
    value = getattr(snapshot, name)
    return _contracts(value) if name in _CONTRACT_FIELDS else _dollars(value)


class ChangeTracker:
    """Remembers each market's previous snapshot, to say what a new one changed."""

    def __init__(self) -> None:
        self._previous: dict[str, types_pb2.MarketSnapshot] = {}

    def changes(self, snapshot: types_pb2.MarketSnapshot) -> list[str] | None:
        """The fields that differ from the market's previous snapshot (None for its first)."""
        previous = self._previous.get(snapshot.ticker)
        self._previous[snapshot.ticker] = snapshot
        if previous is None:
            return None
        return [
            name
            for name in _COMPARED_FIELDS
            if _field_value(previous, name) != _field_value(snapshot, name)
        ]


def snapshot_line(
    snapshot: types_pb2.MarketSnapshot, coalesced: int = 0, changed: list[str] | None = None
) -> str:
    """One snapshot as a line of rich markup: time, ticker, yes/no bid×ask, last, volume; an empty
    side shows "—". With ``changed`` (see :class:`ChangeTracker`) the fields the line does not
    show but that changed follow "Δ", and a snapshot that changed nothing says so."""

    def quote(name: str) -> str:
        return _field_text(snapshot, name)

    line = (
        f"[dim]{_time(snapshot.exchange_time)}[/] [bold]{snapshot.ticker}[/]  "
        f"yes [green]{quote('yes_bid')}[/]×[red]{quote('yes_ask')}[/]  "
        f"no [green]{quote('no_bid')}[/]×[red]{quote('no_ask')}[/]  "
        f"last {quote('last_price')}  vol {quote('volume')}"
    )
    if snapshot.status not in (types_pb2.MARKET_STATUS_OPEN, types_pb2.MARKET_STATUS_UNSPECIFIED):
        line += f"  [yellow]{_status(snapshot.status)}[/]"
    if changed is not None:
        hidden = [name for name in changed if name not in _SHOWN_FIELDS]
        if hidden:
            line += "  [cyan]Δ " + ", ".join(f"{n} {quote(n)}" for n in hidden) + "[/]"
        elif not changed:
            line += "  [dim](no change)[/]"
    if coalesced:
        line += f"  [dim](+{coalesced} conflated)[/]"
    return line


def _feed_gap_line(gap: types_pb2.FeedGap) -> str:
    where = f"{gap.ticker} " if gap.ticker else ""
    state = "recovered" if gap.recovered else "not recovered yet"
    return (
        f"[yellow]! exchange feed gap {where}on {gap.channel}: expected seq "
        f"{gap.expected_sequence}, got {gap.received_sequence} ({state})[/]"
    )


def _stream_line(
    message: market_service_pb2.StreamSnapshotsResponse,
    verbose: bool,
    tracker: ChangeTracker | None = None,
) -> str | None:
    """The human line for a stream message, or None when it is not shown."""
    kind = message.WhichOneof("event")
    if kind == "snapshot":
        snapshot = message.snapshot.snapshot
        changed = tracker.changes(snapshot) if tracker is not None else None
        return snapshot_line(snapshot, message.snapshot.coalesced_count, changed)
    if kind == "caught_up":
        return f"[cyan]── caught up: {message.caught_up.replayed_count} replayed, now live ──[/]"
    if kind == "feed_gap":
        return _feed_gap_line(message.feed_gap)
    if kind == "subscriber_gap":
        return (
            f"[red]! fell behind: {message.subscriber_gap.dropped_count} snapshots skipped "
            f"(resume token {message.resume_token})[/]"
        )
    if kind == "heartbeat" and verbose:
        return f"[dim]· heartbeat {_time(message.heartbeat.server_time)}[/]"
    return None


def trade_line(trade: types_pb2.Trade) -> str:
    """One trade as a line of rich markup: time, ticker, taker side, yes/no price, count."""
    side = types_pb2.Side.Name(trade.taker_side).removeprefix("SIDE_").lower()
    return (
        f"[dim]{_time(trade.create_time)}[/] [bold]{trade.ticker}[/]  taker {side}  "
        f"yes {_dollars(trade.yes_price)}  no {_dollars(trade.no_price)}  "
        f"× {_contracts(trade.count)}"
    )


def _trade_stream_lines(
    message: market_service_pb2.StreamTradesResponse, verbose: bool
) -> list[str]:
    """The human lines for a trade stream message (one a trade)."""
    kind = message.WhichOneof("event")
    if kind == "trade":
        return [trade_line(message.trade)]
    if kind == "trade_batch":
        return [trade_line(trade) for trade in message.trade_batch.trades]
    if kind == "caught_up":
        return [f"[cyan]── caught up: {message.caught_up.replayed_count} replayed, now live ──[/]"]
    if kind == "heartbeat" and verbose:
        return [f"[dim]· heartbeat {_time(message.heartbeat.server_time)}[/]"]
    return []


async def tail_trades(options: argparse.Namespace, console: Console) -> int:
    """`tail --trades`: follow the public tape until interrupted (or ``--limit`` trades)."""

    def show(message: market_service_pb2.StreamTradesResponse) -> None:
        for line in _trade_stream_lines(message, options.verbose):
            console.print(line, soft_wrap=True, highlight=False)

    # With --limit, one trade a message: a batch's token resumes after its last trade only, so
    # stopping inside a batch would show more than asked or hand out a token past unshown trades.
    batch = 1 if options.limit is not None else DEFAULT_MAX_BATCH_SIZE
    return await _follow(
        options,
        console,
        lambda client, common: client.stream_trades(
            options.tickers, max_batch_size=batch, **common
        ),
        show,
        lambda message: len(message.trade_batch.trades) + message.HasField("trade"),
    )


_StreamResponse = TypeVar(
    "_StreamResponse",
    market_service_pb2.StreamSnapshotsResponse,
    market_service_pb2.StreamTradesResponse,
    market_service_pb2.StreamOrderBooksResponse,
)


async def _follow(
    options: argparse.Namespace,
    console: Console,
    open_stream: Callable[[KfeedClient, dict[str, Any]], AsyncIterator[_StreamResponse]],
    show: Callable[[_StreamResponse], object],
    counted: Callable[[_StreamResponse], int],
) -> int:
    """Follow one `tail` stream until interrupted, or until ``--limit`` of the items ``counted``
    has been shown: JSON lines, or what ``show`` prints; then the token to resume with."""
    last_token = options.resume or ""
    shown = 0
    common: dict[str, Any] = {
        "start_time": options.start,
        "resume_token": options.resume,
        "event_ticker": options.event,
        "series_ticker": options.series,
        "heartbeat_interval": timedelta(seconds=options.heartbeat) if options.heartbeat else None,
    }
    try:
        async with _connect(options) as client:
            async for message in open_stream(client, common):
                last_token = message.resume_token or last_token
                if options.json:
                    if options.verbose or not message.HasField("heartbeat"):
                        console.out(_json(message), highlight=False)
                else:
                    show(message)
                items = counted(message)
                shown += items
                if items and options.limit is not None and shown >= options.limit:
                    break
    finally:
        # Printed also on Ctrl-C, so the next run can continue exactly here.
        if last_token and not options.json:
            again = f"--resume {last_token}"
            if options.start is not None and not options.book:
                # The start still selects the rows after the token (a book stream's starting
                # books are behind it already).
                again += f" --from {options.start.isoformat()}"
            print(f"resume with: {again}", file=sys.stderr)
    return 0


def _top_of_book(book: LocalOrderBook) -> str:
    """The best YES bid and YES ask (1 − the best NO bid) with their sizes."""
    yes, no = book.yes_bids(1), book.no_bids(1)
    bid = f"{_price(yes[0][0])} × {_size(yes[0][1])}" if yes else "—"
    ask = f"{_price(10_000 - no[0][0])} × {_size(no[0][1])}" if no else "—"
    return f"yes bid {bid} | yes ask {ask}"


def book_change_line(change: types_pb2.OrderBookChange, before: int, book: LocalOrderBook) -> str:
    """One applied change: time, market, the level (size before → after), then the top of book."""
    side = "[green]yes bid[/]" if change.side == types_pb2.SIDE_YES else "[red]no bid[/]"
    after = change.size.hundredths
    moved = f"{_size(before)} → {_size(after)}" if before else f"new {_size(after)}"
    if not after:
        moved = f"{_size(before)} → [dim]gone[/]"
    return (
        f"[dim]{_time(change.exchange_time)}[/] [bold]{change.ticker}[/]  {side} "
        f"{_price(change.price.ten_thousandths)}  {moved}   {_top_of_book(book)}"
    )


class BookPrinter:
    """Shows an order-book stream readably: a ladder for each full book, a line per change."""

    def __init__(self, console: Console, depth: int, verbose: bool) -> None:
        self._console = console
        self._depth = depth
        self._verbose = verbose
        self.books = LocalOrderBooks()

    def _ladder(self, book: LocalOrderBook, why: str) -> None:
        time = f" as of {_time(book.exchange_time)} UTC" if book.exchange_time else ""
        self._console.print(f"[bold]{book.ticker}[/] {why}{time}", highlight=False)
        if book.in_feed_gap:
            self._console.print("[yellow]! the feed had a gap here: this book may be incomplete[/]")
        ladder = book_ladder(book.yes_bids(self._depth), book.no_bids(self._depth))
        self._console.print(ladder, soft_wrap=True)

    def show(self, message: market_service_pb2.StreamOrderBooksResponse) -> int:
        """Print ``message`` (already unbatched); how many books and changes it held."""
        kind = message.WhichOneof("event")
        if kind == "book":
            self._ladder(self.books.apply(message) or LocalOrderBook(message.book.ticker), "book")
            return 1
        if kind == "change":
            change = message.change
            local = self.books.books.get(change.ticker)
            side = (
                None
                if local is None
                else (local.yes if change.side == types_pb2.SIDE_YES else local.no)
            )
            before = 0 if side is None else side.get(change.price.ten_thousandths, 0)
            book = self.books.apply(message)
            assert book is not None
            self._console.print(book_change_line(change, before, book), soft_wrap=True,
                                highlight=False)  # fmt: skip
            return 1
        line = None
        if kind == "caught_up":
            line = (
                f"[cyan]── caught up: {message.caught_up.replayed_count} replayed, now live ──[/]"
            )
        elif kind == "feed_gap":
            line = _feed_gap_line(message.feed_gap)
        elif kind == "subscriber_gap":
            line = f"[red]! fell behind: {message.subscriber_gap.dropped_count} skipped[/]"
        elif kind == "heartbeat" and self._verbose:
            line = f"[dim]· heartbeat {_time(message.heartbeat.server_time)}[/]"
        if line is not None:
            self._console.print(line, soft_wrap=True, highlight=False)
        return 0


async def tail_books(options: argparse.Namespace, console: Console) -> int:
    """`tail --book`: follow the order books until interrupted (or ``--limit`` books and
    changes)."""
    printer = BookPrinter(console, options.depth, options.verbose)
    batch = 1 if options.limit is not None else DEFAULT_MAX_BATCH_SIZE  # see tail_trades
    return await _follow(
        options,
        console,
        lambda client, common: client.stream_order_books(
            options.tickers, max_batch_size=batch, **common
        ),
        printer.show,
        lambda message: (
            len(message.batch.updates) + message.HasField("book") + message.HasField("change")
        ),
    )


async def tail(options: argparse.Namespace, console: Console) -> int:
    """`tail`: follow the feed until interrupted (or ``--limit`` snapshots)."""
    if options.trades:
        return await tail_trades(options, console)
    if options.book:
        return await tail_books(options, console)
    tracker = ChangeTracker()

    def show(message: market_service_pb2.StreamSnapshotsResponse) -> None:
        line = _stream_line(message, options.verbose, tracker)
        if line is not None:
            console.print(line, soft_wrap=True, highlight=False)

    return await _follow(
        options,
        console,
        lambda client, common: client.stream_snapshots(
            options.tickers,
            include_latest=options.include_latest,
            conflation_interval=(
                timedelta(milliseconds=options.conflate) if options.conflate else None
            ),
            **common,
        ),
        show,
        lambda message: int(message.HasField("snapshot")),
    )


_MARKET_COLUMNS = ("ticker", "status", "event", "close time", "title")
_MIN_TITLE = 16


async def markets(options: argparse.Namespace, console: Console) -> int:
    """`markets`: list markets: a table as wide as the terminal, tab-separated lines when the
    output is not a terminal (a file or a pipe: nothing cut or wrapped), or JSON lines."""
    rows: list[tuple[str, ...]] = []
    async with _connect(options) as client:
        async for market in client.list_markets(
            event_ticker=options.event, series_ticker=options.series, statuses=options.status
        ):
            if options.json:
                console.out(_json(market), highlight=False)
                continue
            close = _time(market.close_time) if market.HasField("close_time") else ""
            rows.append(
                (market.ticker, _status(market.status), market.event_ticker, close, market.title)
            )
    if not options.json:
        print_markets(rows, console)
    return 0


def print_markets(rows: Sequence[tuple[str, ...]], console: Console) -> None:
    """``rows`` (see _MARKET_COLUMNS) as a table on a terminal, else (or on a terminal too narrow
    for a whole ticker) as tab-separated lines."""
    longest_ticker = max([len(row[0]) for row in rows], default=0)
    if not console.is_terminal or console.width < longest_ticker + 10:
        for row in [_MARKET_COLUMNS, *rows]:
            console.file.write("\t".join(cell.replace("\t", " ") for cell in row) + "\n")
        return
    # Every column but the title is as wide as its widest cell: identifiers are what users copy
    # into the next command, so they are never cut or wrapped. The title folds into what is left;
    # when too little is left, the close time, the event and the status go (--json has them all).
    widths = [
        max([len(header), *(len(row[index]) for row in rows)])
        for index, header in enumerate(_MARKET_COLUMNS)
    ]
    shown = [0, 1, 2, 3]
    while len(shown) > 1 and console.width - sum(widths[i] + 2 for i in shown) < _MIN_TITLE:
        shown.pop()  # the close time, then the event, then the status
    table = Table(box=None, padding=(0, 2, 0, 0))
    for index in shown:
        table.add_column(_MARKET_COLUMNS[index], no_wrap=True, width=widths[index])
    title_width = max(8, console.width - sum(widths[i] + 2 for i in shown) - 1)
    table.add_column("title", overflow="fold", width=title_width)
    for row in rows:
        table.add_row(*(row[index] for index in shown), row[-1])
    console.print(table, crop=False)


async def snapshots(options: argparse.Namespace, console: Console) -> int:
    """`snapshots`: a market's stored snapshots in a window, oldest first."""
    count = 0
    tracker = ChangeTracker()
    async with _connect(options) as client:
        async for snapshot in client.iter_snapshots(options.ticker, options.start, options.end):
            if options.json:
                console.out(_json(snapshot), highlight=False)
            else:
                line = snapshot_line(snapshot, changed=tracker.changes(snapshot))
                console.print(line, soft_wrap=True, highlight=False)
            count += 1
            if options.limit is not None and count >= options.limit:
                break
    return 0


def _ohlc(ohlc: types_pb2.PriceOhlc) -> str:
    return " ".join(_dollars(price) for price in (ohlc.open, ohlc.high, ohlc.low, ohlc.close))


def candle_line(candle: types_pb2.Candle) -> str:
    """One candle as a line of rich markup: start, YES bid and ask open/high/low/close, trade
    open/high/low/close with the mean, volume (trades), open interest; "—" where absent."""
    has = candle.HasField
    bid = _ohlc(candle.yes_bid) if has("yes_bid") else "—"
    ask = _ohlc(candle.yes_ask) if has("yes_ask") else "—"
    trades = (
        f"trades {_ohlc(candle.price)} mean {_dollars(candle.mean_price)}"
        if has("price")
        else "[dim]no trades[/]"
    )
    interest = _contracts(candle.open_interest) if has("open_interest") else "—"
    return (
        f"[dim]{_time(candle.start_time)[:-4]}[/]  bid [green]{bid}[/]  ask [red]{ask}[/]  "
        f"{trades}  vol {_contracts(candle.volume)} ({candle.trade_count})  OI {interest}"
    )


async def candles(options: argparse.Namespace, console: Console) -> int:
    """`candles`: a market's candles, a line each (bid, ask and trades open/high/low/close) or
    JSON lines."""
    interval: timedelta = options.interval
    start = options.start or datetime.now(UTC) - 24 * interval
    async with _connect(options) as client:
        async for candle in client.iter_candles(options.ticker, interval, start, options.end):
            if options.json:
                console.out(_json(candle), highlight=False)
            else:
                console.print(candle_line(candle), soft_wrap=True, highlight=False)
    return 0


def _price(units: int) -> str:
    return _dollars(types_pb2.Dollars(ten_thousandths=units))


def _size(units: int) -> str:
    return _contracts(types_pb2.Contracts(hundredths=units))


def book_ladder(yes_bids: Sequence[Level], no_bids: Sequence[Level]) -> Table:
    """The book as a ladder: NO bids (the YES asks they are) above, YES bids below, each side
    best nearest the middle. A YES bid at X is a NO ask at 1 − X, so the YES ask is 1 − the best
    NO bid. Levels are (price, size) in wire units, best first."""
    table = Table(box=None)
    for header in ("side", "price", "size", "as the other side"):
        table.add_column(header, justify="left" if header == "side" else "right")
    for price, size in reversed(no_bids):  # the YES asks, highest first, down to the best
        table.add_row("[red]no bid[/]", _price(price), _size(size),
                      f"yes ask {_price(10_000 - price)}")  # fmt: skip
    table.add_section()
    for price, size in yes_bids:
        table.add_row("[green]yes bid[/]", _price(price), _size(size),
                      f"no ask {_price(10_000 - price)}")  # fmt: skip
    return table


def _proto_levels(levels: Sequence[types_pb2.PriceLevel]) -> list[Level]:
    return [(level.price.ten_thousandths, level.size.hundredths) for level in levels]


async def book(options: argparse.Namespace, console: Console) -> int:
    """`book`: a market's order book at an instant, as a ladder (or JSON)."""
    async with _connect(options) as client:
        found = await client.get_order_book(options.ticker, options.at, options.depth)
    if options.json:
        console.out(_json(found), highlight=False)
        return 0
    sequence = f", seq {found.exchange_sequence}" if found.HasField("exchange_sequence") else ""
    console.print(
        f"[bold]{found.ticker}[/] as of {_time(found.exchange_time)} UTC{sequence}",
        highlight=False,
    )
    if found.in_feed_gap:
        console.print("[yellow]! the feed had a gap here: this book may be incomplete[/]")
    ladder = book_ladder(_proto_levels(found.yes_bids), _proto_levels(found.no_bids))
    console.print(ladder, soft_wrap=True)
    return 0


async def export(options: argparse.Namespace, console: Console) -> int:
    """`export`: stored snapshots or trades into a Parquet, CSV or Arrow file."""
    from kfeed_client.arrow import file_format, write_file

    path: Path = options.output
    file_type = file_format(path, options.format)
    progress = Progress(
        TextColumn(f"exporting {options.kind} to {path}"),
        TextColumn("{task.completed:,} rows"),
        TextColumn("({task.fields[rate]})"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=options.quiet,
    )
    task = progress.add_task("export", total=None, rate="")
    started = time.monotonic()

    def advance(rows: int) -> None:
        progress.advance(task, rows)
        done = progress.tasks[0].completed
        progress.update(task, rate=f"{done / max(time.monotonic() - started, 1e-9):,.0f} rows/s")

    async with _connect(options) as client:
        exporter = {
            "snapshots": client.export_snapshot_batches,
            "trades": client.export_trade_batches,
            "book-changes": client.export_order_book_change_batches,
        }[options.kind]
        batches = exporter(
            options.tickers, event_ticker=options.event, series_ticker=options.series,
            start=options.start, end=options.end, on_rows=advance,
        )  # fmt: skip
        with progress:
            rows = await write_file(batches, path, file_type)
    console.print(f"wrote {rows:,} {options.kind} to {path} ({file_type})", highlight=False)
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command, str]] = {
    "tail": (_configure_tail, tail, "follow the live snapshot feed (history first with --from)"),
    "markets": (_configure_markets, markets, "list markets"),
    "snapshots": (_configure_snapshots, snapshots, "list a market's stored snapshots"),
    "candles": (_configure_candles, candles, "print a market's candles (OHLC) at an interval"),
    "book": (_configure_book, book, "print a market's order book (now, or --at a past time)"),
    "export": (_configure_export, export, "export snapshots or trades to Parquet, CSV or Arrow"),
}


class ServerUnreachable(Exception):
    """The server did not answer within ``--connect-timeout``."""


async def ensure_reachable(options: argparse.Namespace) -> None:
    """Return once a channel to ``--server`` is ready; :class:`ServerUnreachable` after
    ``--connect-timeout`` seconds (a call would otherwise wait, or retry, for ever)."""
    timeout = float(options.connect_timeout)
    async with _connect(options) as client:
        try:
            await asyncio.wait_for(client.channel.channel_ready(), timeout)
        except TimeoutError:
            raise ServerUnreachable(
                f"no kfeed server answered at {options.server} within {timeout:g} s"
                " (is `kfeed serve` running? --server / KFEED_SERVER)"
            ) from None


async def execute(options: argparse.Namespace, console: Console | None = None) -> int:
    """Run parsed options; an unreachable server and gRPC errors become a one-line message on
    stderr and exit status 1."""
    _, command, _ = COMMANDS[options.command]
    prog = getattr(options, "prog", "kfeed")
    try:
        await ensure_reachable(options)
        return await command(options, console or Console(soft_wrap=True))
    except ServerUnreachable as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as error:
        print(f"{prog}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1


class CliParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None, *, prog: str = "kfeed-client") -> int:
    """`kfeed-client COMMAND [flags]`; returns the exit status."""
    options = build_parser(prog).parse_args(argv)
    options.prog = f"{prog} {options.command}"
    return _run_to_completion(options)


def _run_to_completion(options: argparse.Namespace) -> int:
    try:
        return asyncio.run(execute(options))
    except KeyboardInterrupt:
        print(f"{options.prog}: interrupted", file=sys.stderr)
        return 130


def _run(command: str, argv: Sequence[str], prog: str) -> int:
    configure, _, help_text = COMMANDS[command]
    parser = CliParser(prog=prog, description=help_text)
    configure(parser)
    options = parser.parse_args(argv)
    options.command = command
    options.prog = prog
    return _run_to_completion(options)


def run_tail(argv: Sequence[str], prog: str = "kfeed tail") -> int:
    """`kfeed tail …` for the root command: ``argv`` are the flags after `tail`."""
    return _run("tail", argv, prog)


def run_markets(argv: Sequence[str], prog: str = "kfeed markets") -> int:
    """`kfeed markets …` for the root command: ``argv`` are the flags after `markets`."""
    return _run("markets", argv, prog)


def run_snapshots(argv: Sequence[str], prog: str = "kfeed snapshots") -> int:
    """`kfeed snapshots …` for the root command: ``argv`` are the flags after `snapshots`."""
    return _run("snapshots", argv, prog)


def run_book(argv: Sequence[str], prog: str = "kfeed book") -> int:
    """`kfeed book …` for the root command: ``argv`` are the flags after `book`."""
    return _run("book", argv, prog)


def run_candles(argv: Sequence[str], prog: str = "kfeed candles") -> int:
    """`kfeed candles …` for the root command: ``argv`` are the flags after `candles`."""
    return _run("candles", argv, prog)


def run_export(argv: Sequence[str], prog: str = "kfeed export") -> int:
    """`kfeed export snapshots|trades …` for the root command."""
    return _run("export", argv, prog)


if __name__ == "__main__":
    raise SystemExit(main())
