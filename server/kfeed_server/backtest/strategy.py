"""The strategy interface: what a strategy sees, what it returns, and the registry of strategies.

A strategy is a class. The engine builds one instance per run from the validated parameters, calls
``on_start`` once, ``on_snapshot`` for every replayed snapshot in (exchange time, snapshot id)
order, and ``on_end`` once after the last snapshot (before end-of-window settlement and marking).
See docs/BACKTESTING.md for a worked example.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Protocol, TypeVar

from kfeed_server.backtest.params import ConfigError, Parameters, ParameterSpec, ParamValue
from kfeed_server.records import MarketRecord, OrderAction, Side, SnapshotRecord


@dataclass(frozen=True, slots=True)
class Order:
    """A market (taker) order: it fills at once at the touch or not at all.

    ``count`` is in 1/100 contract and must be positive; ``side`` YES or NO; ``action`` BUY or
    SELL. ``probability``, when given, is the strategy's stated probability (0..1) that the market
    settles YES, whatever side it trades; it feeds the Brier score.
    """

    ticker: str
    side: Side
    action: OrderAction
    count: int
    probability: float | None = None


class MarketView(Protocol):
    """Read-only market data as of the snapshot being replayed."""

    @property
    def time(self) -> datetime:
        """Exchange time of the snapshot being replayed."""
        ...

    def latest(self, ticker: str) -> SnapshotRecord | None:
        """The most recent replayed snapshot of ``ticker`` (None before its first one)."""
        ...

    def market(self, ticker: str) -> MarketRecord | None:
        """The market's metadata, when the engine was given it.

        It may carry the final result: a strategy that reads ``result`` looks into the future.
        """
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
        """Contracts held (1/100 contract) in ``ticker`` on ``side``; 0 when flat."""
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
    ) -> Sequence[Order]:
        """Returns the orders to place at this snapshot (usually an empty tuple)."""
        raise NotImplementedError

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
