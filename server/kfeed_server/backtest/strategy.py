"""The strategy interface: what a strategy sees, what it returns, and the registry of strategies.

A strategy is a class. The engine builds one instance per run from the validated parameters, calls
``on_start`` once, ``on_snapshot`` for every replayed snapshot in (exchange time, snapshot id)
order, ``on_book`` / ``on_trade`` for replayed books and public trades, ``on_fill`` for each fill
of its own orders, and ``on_end`` once after the last event (before end-of-window settlement and
marking). Every hook but ``on_start``/``on_end`` returns instructions (orders and cancels). See
docs/BACKTESTING.md for the API and a worked example.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

from kfeed_server.backtest.books import BookState
from kfeed_server.backtest.orders import Fill, Instruction, Order
from kfeed_server.backtest.params import ConfigError, Parameters, ParameterSpec
from kfeed_server.records import MarketRecord, Side, SnapshotRecord, TradeRecord
from kfeed_server.records.backtest import ParamValue

if TYPE_CHECKING:
    from kfeed_server.backtest.engine import RestingOrderView

__all__ = ["Order"]  # re-exported: strategies import it from here or from the package


class MarketView(Protocol):
    """Read-only market data as of the snapshot being replayed."""

    @property
    def time(self) -> datetime:
        """Exchange time of the snapshot being replayed."""
        ...

    def latest(self, ticker: str) -> SnapshotRecord | None:
        """The most recent replayed snapshot of ``ticker`` (None before its first one)."""
        ...

    def book(self, ticker: str) -> BookState | None:
        """The most recent replayed book of ``ticker`` (None without books)."""
        ...

    def market(self, ticker: str) -> MarketRecord | None:
        """The market's metadata, when the engine was given it. Before the market's settlement
        time its result, settlement time and value and status are blank: no look-ahead."""
        ...


class PortfolioView(Protocol):
    """Read-only account state before this snapshot's orders."""

    @property
    def cash(self) -> int:
        """Cash in 1/10,000 USD."""
        ...

    @property
    def initial_cash(self) -> int:
        """Starting cash in 1/10,000 USD."""
        ...

    @property
    def equity(self) -> int:
        """Cash plus open positions marked at the bid, in 1/10,000 USD."""
        ...

    def position(self, ticker: str, side: Side) -> int:
        """Contracts held (1/100 contract) in ``ticker`` on ``side``; 0 when flat or holding the
        other side (YES and NO net into one position)."""
        ...

    def net_position(self, ticker: str) -> int:
        """The market's position: YES contracts positive, NO contracts negative."""
        ...

    def open_orders(self, ticker: str) -> tuple[RestingOrderView, ...]:
        """The strategy's resting limit orders in ``ticker``, oldest first."""
        ...


class Strategy:
    """Base class of backtest strategies.

    Subclasses set ``name``, ``description`` and ``parameters`` (the schema ListStrategies
    exposes), read their values in ``__init__`` through the typed accessors of ``Parameters``, and
    override ``on_snapshot``. Keep all state on the instance: the engine creates a fresh one per
    run, which keeps runs deterministic and independent.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    parameters: ClassVar[tuple[ParameterSpec, ...]] = ()

    def __init__(self, params: Parameters) -> None:
        self.params = params

    @classmethod
    def check_parameters(cls, values: Mapping[str, ParamValue]) -> None:
        """Checks relations between parameters (each one alone is already valid); raises
        ConfigError naming ``parameters.<name>``. The default accepts everything."""

    def on_start(self, market: MarketView, portfolio: PortfolioView) -> None:
        """Called once before the first snapshot."""

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        """Returns the orders (and cancels) to send at this snapshot (usually an empty tuple)."""
        raise NotImplementedError

    def on_book(
        self, book: BookState, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        """Called for each replayed book (runs given books only)."""
        return ()

    def on_trade(
        self, trade: TradeRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        """Called for each replayed public trade (runs given trades only)."""
        return ()

    def on_fill(
        self, fill: Fill, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        """Called for each fill of the strategy's own orders, right after it."""
        return ()

    def on_end(self, market: MarketView, portfolio: PortfolioView) -> None:
        """Called once after the last snapshot."""


StrategyT = TypeVar("StrategyT", bound=type[Strategy])


class StrategyRegistry:
    """Strategies by name. ``default_registry`` holds the built-ins; a user registers a class with
    ``default_registry.register(MyStrategy)`` or the ``@register_strategy`` decorator, at import
    time of a module that the process running the backtest also imports."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Strategy]] = {}

    def register(self, cls: StrategyT) -> StrategyT:
        """Adds ``cls`` under ``cls.name``; returns it, so it works as a decorator."""
        if not cls.name:
            raise ValueError(f"{cls.__qualname__} has no name")
        if cls.name in self._classes and self._classes[cls.name] is not cls:
            raise ValueError(f"a different strategy is already registered as {cls.name!r}")
        names = [spec.name for spec in cls.parameters]
        if len(set(names)) != len(names):
            raise ValueError(f"{cls.name}: duplicate parameter names {names}")
        self._classes[cls.name] = cls
        return cls

    def get(self, name: str) -> type[Strategy]:
        """The strategy called ``name``; ConfigError on the field ``strategy`` when unknown."""
        try:
            return self._classes[name]
        except KeyError:
            known = ", ".join(sorted(self._classes))
            raise ConfigError("strategy", f"unknown strategy {name!r} (known: {known})") from None

    def __iter__(self) -> Iterator[type[Strategy]]:
        """The strategies, sorted by name."""
        return iter([self._classes[name] for name in sorted(self._classes)])

    def __contains__(self, name: object) -> bool:
        return name in self._classes


default_registry = StrategyRegistry()
"""The process-wide registry: the built-ins plus whatever users register."""


def register_strategy(cls: StrategyT) -> StrategyT:
    """Class decorator: registers ``cls`` in ``default_registry``."""
    return default_registry.register(cls)
