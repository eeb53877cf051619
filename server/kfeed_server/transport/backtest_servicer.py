"""kfeed.v1.BacktestService: requests mapped onto ``BacktestRunner``, records onto messages.

Proto "0 / unset means the default" fields are mapped onto the engine's explicit defaults here.
A bad configuration is INVALID_ARGUMENT naming the request field (``config.strategy``,
``config.parameters.<name>``, ``sweep.grid.<name>``, ``sweep.rank_by``, ...); a ticker that is not
a known market is NOT_FOUND (as in MarketService.StreamSnapshots); an unknown backtest NOT_FOUND.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2

from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed_server.backtest import (
    DEFAULT_INITIAL_CASH,
    KALSHI_TAKER_FEE_RATE,
    ConfigError,
    EngineConfig,
    FeeRounding,
    ParameterSpec,
    ParameterType,
    ParamValue,
    StrategyRegistry,
    default_registry,
)
from kfeed_server.backtest.config import MAX_LATENCY
from kfeed_server.backtest.service import BacktestRunner, UnknownMarkets
from kfeed_server.records import BacktestState, EquityPointRecord, ExecutionRecord
from kfeed_server.records.backtest import (
    DEFAULT_RANK_BY,
    KALSHI_MAKER_FEE_RATE,
    BacktestMetrics,
    BacktestRecord,
    DataQuality,
    FillModel,
    GapPolicy,
    SweepSpec,
    WalkForwardOutcome,
    WalkForwardSpec,
)
from kfeed_server.transport.caller import Caller, current_caller
from kfeed_server.transport.convert import contracts, dollars, timestamp
from kfeed_server.transport.errors import InvalidArgument, NotFound, PermissionDenied
from kfeed_server.transport.requests import (
    MAX_ID_LENGTH,
    PageSizeLimits,
    RequestTokens,
    check_text,
    duration_seconds,
    optional_name,
    optional_time,
    require_id,
    require_ticker,
)

BACKTESTS_PAGE = PageSizeLimits(default=50, maximum=500)
EXECUTIONS_PAGE = PageSizeLimits(default=1000, maximum=10_000)
DEFAULT_WATCH_INTERVAL = 0.25

Context = grpc.aio.ServicerContext[Any, Any]


# --- requests → domain ---------------------------------------------------------------------------


def parameter_from_proto(value: pb.ParameterValue, field: str) -> ParamValue:
    """The Python value of a ``ParameterValue`` (INTEGER and DOLLARS become int)."""
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument.field(field, "has no value")
    if kind == "dollars_value":
        return value.dollars_value.ten_thousandths
    result: ParamValue = getattr(value, kind)
    if isinstance(result, str):
        check_text(result, field)
    return result


def parameter_to_proto(value: ParamValue, kind: ParameterType | None = None) -> pb.ParameterValue:
    """``value`` as a ``ParameterValue`` of the spec's type (by its Python type without one)."""
    if kind is ParameterType.DOLLARS and isinstance(value, int):
        return pb.ParameterValue(dollars_value=dollars(value))
    if isinstance(value, bool):
        return pb.ParameterValue(boolean_value=value)
    if isinstance(value, str):
        return pb.ParameterValue(string_value=value)
    if isinstance(value, float) or kind is ParameterType.NUMBER:
        return pb.ParameterValue(number_value=float(value))
    return pb.ParameterValue(integer_value=value)


def _request_field(engine_field: str) -> str:
    """The request path of a ConfigError field (the engine names fields inside the config)."""
    return engine_field if engine_field.startswith("sweep.") else f"config.{engine_field}"


def config_from_proto(config: pb.BacktestConfig) -> EngineConfig:
    """The engine configuration of a request's ``config`` (unset fields take the defaults)."""
    try:
        fee_rounding = FeeRounding(config.fee_rounding)
    except ValueError:
        raise InvalidArgument.field("config.fee_rounding", "unknown fee rounding") from None
    try:
        fill_model = FillModel(config.fill_model)
    except ValueError:
        raise InvalidArgument.field("config.fill_model", "unknown fill model") from None
    try:
        gap_policy = GapPolicy(config.gap_policy)
    except ValueError:
        raise InvalidArgument.field("config.gap_policy", "unknown gap policy") from None
    return EngineConfig(
        strategy=optional_name(config.strategy, "config.strategy"),
        tickers=tuple(
            require_ticker(ticker, f"config.tickers[{i}]")
            for i, ticker in enumerate(config.tickers)
        ),
        parameters={
            _parameter_name(name, "config.parameters"): parameter_from_proto(
                value, f"config.parameters.{name}"
            )
            for name, value in sorted(config.parameters.items())
        },
        start_time=optional_time(config, "start_time", "config.start_time"),
        end_time=optional_time(config, "end_time", "config.end_time"),
        initial_cash=config.initial_cash.ten_thousandths or DEFAULT_INITIAL_CASH,
        taker_fee_rate_ten_thousandths=(
            config.taker_fee_rate_ten_thousandths or KALSHI_TAKER_FEE_RATE
        ),
        fee_rounding=fee_rounding,
        slippage=config.slippage.ten_thousandths,
        max_position=config.max_position.hundredths,
        cap_by_displayed_size=config.cap_by_displayed_size,
        fill_model=fill_model,
        maker_fee_rate_ten_thousandths=(
            config.maker_fee_rate_ten_thousandths or KALSHI_MAKER_FEE_RATE
        ),
        latency=_latency(config),
        queue_cancel_share_ten_thousandths=config.queue_cancel_share_ten_thousandths,
        gap_policy=gap_policy,
    )


def _latency(config: pb.BacktestConfig) -> timedelta:
    """``config.latency`` exactly (to the microsecond), within 0 .. MAX_LATENCY."""
    if not config.HasField("latency"):
        return timedelta(0)
    value = config.latency
    bounds = f"must be between 0 and {MAX_LATENCY.total_seconds():g} s"
    if (
        not 0 <= value.nanos <= 999_999_999
        or not 0 <= value.seconds <= MAX_LATENCY.days * 86_400 + MAX_LATENCY.seconds
    ):
        raise InvalidArgument.field("config.latency", bounds)
    latency = timedelta(seconds=value.seconds, microseconds=value.nanos // 1_000)
    if latency > MAX_LATENCY:
        raise InvalidArgument.field("config.latency", bounds)
    return latency


def _parameter_name(name: str, path: str) -> str:
    """A parameter name (a map key); a bad one is reported on the map, ``path``."""
    return optional_name(name, path)


def sweep_from_proto(sweep: pb.ParameterSweep) -> SweepSpec:
    """A request's sweep; an empty ``rank_by`` ranks by ``DEFAULT_RANK_BY``."""
    optional_name(sweep.rank_by, "sweep.rank_by")
    grid = {
        _parameter_name(name, "sweep.grid"): [
            parameter_from_proto(value, f"sweep.grid.{name}") for value in values.values
        ]
        for name, values in sorted(sweep.grid.items())
    }
    walk_forward = None
    if sweep.HasField("walk_forward"):
        fraction = sweep.walk_forward.in_sample_fraction
        if not math.isfinite(fraction):
            raise InvalidArgument.field("sweep.walk_forward.in_sample_fraction", "not a number")
        walk_forward = WalkForwardSpec(sweep.walk_forward.folds, fraction)
    return SweepSpec(grid=grid, rank_by=sweep.rank_by or DEFAULT_RANK_BY, walk_forward=walk_forward)


# --- domain → messages ---------------------------------------------------------------------------


def _parameter_types(strategy: str, registry: StrategyRegistry) -> dict[str, ParameterType]:
    if strategy not in registry:
        return {}
    return {spec.name: spec.type for spec in registry.get(strategy).parameters}


def config_to_proto(config: EngineConfig, registry: StrategyRegistry) -> pb.BacktestConfig:
    """A stored configuration as a ``BacktestConfig`` (every default spelled out)."""
    types = _parameter_types(config.strategy, registry)
    message = pb.BacktestConfig(
        strategy=config.strategy,
        tickers=config.tickers,
        parameters={
            name: parameter_to_proto(value, types.get(name))
            for name, value in config.parameters.items()
        },
        initial_cash=dollars(config.initial_cash),
        taker_fee_rate_ten_thousandths=config.taker_fee_rate_ten_thousandths,
        fee_rounding=int(config.fee_rounding),  # type: ignore[arg-type]
        slippage=dollars(config.slippage),
        max_position=contracts(config.max_position),
        cap_by_displayed_size=config.cap_by_displayed_size,
        fill_model=int(config.fill_model),  # type: ignore[arg-type]
        maker_fee_rate_ten_thousandths=config.maker_fee_rate_ten_thousandths,
        queue_cancel_share_ten_thousandths=config.queue_cancel_share_ten_thousandths,
        fee_schedule_version=config.fee_schedule_version,
        gap_policy=int(config.gap_policy),  # type: ignore[arg-type]
    )
    if config.latency:
        message.latency.FromTimedelta(config.latency)
    if config.start_time is not None:
        message.start_time.CopyFrom(timestamp(config.start_time))
    if config.end_time is not None:
        message.end_time.CopyFrom(timestamp(config.end_time))
    return message


def _sweep_to_proto(
    sweep: SweepSpec, strategy: str, registry: StrategyRegistry
) -> pb.ParameterSweep:
    types = _parameter_types(strategy, registry)
    message = pb.ParameterSweep(
        grid={
            name: pb.ParameterValues(
                values=[parameter_to_proto(v, types.get(name)) for v in values]
            )
            for name, values in sweep.grid.items()
        },
        rank_by=sweep.rank_by,
    )
    if sweep.walk_forward is not None:
        message.walk_forward.folds = sweep.walk_forward.folds
        message.walk_forward.in_sample_fraction = sweep.walk_forward.in_sample_fraction
    return message


def _fold_to_proto(outcome: WalkForwardOutcome) -> pb.WalkForwardFold:
    return pb.WalkForwardFold(
        fold=outcome.fold_index,
        in_sample_start=timestamp(outcome.fold.in_sample_start),
        out_of_sample_start=timestamp(outcome.fold.out_of_sample_start),
        end=timestamp(outcome.fold.end),
        best_in_sample_backtest_id=outcome.best_in_sample_id,
        out_of_sample_backtest_id=outcome.out_of_sample_id,
    )


def metrics_to_proto(metrics: BacktestMetrics) -> pb.BacktestMetrics:
    """Metrics as a ``BacktestMetrics``."""
    duration = duration_pb2.Duration()
    duration.FromTimedelta(metrics.max_drawdown_duration)
    message = pb.BacktestMetrics(
        total_pnl=dollars(metrics.total_pnl),
        total_return=metrics.total_return,
        sharpe_ratio=metrics.sharpe_ratio,
        sortino_ratio=metrics.sortino_ratio,
        max_drawdown=dollars(metrics.max_drawdown),
        max_drawdown_fraction=metrics.max_drawdown_fraction,
        max_drawdown_duration=duration,
        win_rate=metrics.win_rate,
        profit_factor=metrics.profit_factor,
        expectancy=dollars(metrics.expectancy),
        trade_count=metrics.trade_count,
        fees_paid=dollars(metrics.fees_paid),
        exposure=metrics.exposure,
    )
    if metrics.brier_score is not None:
        message.brier_score = metrics.brier_score
    return message


def backtest_to_proto(
    record: BacktestRecord,
    registry: StrategyRegistry,
    equity_curve: list[EquityPointRecord] | None = None,
) -> pb.Backtest:
    """A backtest record as a ``Backtest`` (the FULL view when ``equity_curve`` is given)."""
    message = pb.Backtest(
        backtest_id=record.backtest_id,
        config=config_to_proto(record.config, registry),
        state=int(record.state),  # type: ignore[arg-type]
        progress=pb.BacktestProgress(
            fraction_done=record.fraction_done,
            snapshots_processed=record.snapshots_processed,
            snapshots_total=record.snapshots_total,
            interim_pnl=dollars(record.interim_pnl),
        ),
        code_version=record.code_version,
        create_time=timestamp(record.create_time),
        error_message=record.error_message,
        parent_backtest_id=record.parent_backtest_id or "",
        creator=record.created_by,
        ranked_child_ids=record.ranked_child_ids,
        walk_forward_folds=[_fold_to_proto(f) for f in record.walk_forward_folds],
    )
    if record.metrics is not None:
        message.metrics.CopyFrom(metrics_to_proto(record.metrics))
    if record.content_hash:
        message.data_fingerprint.CopyFrom(
            pb.DataFingerprint(
                row_count=record.row_count,
                first_snapshot_id=record.first_snapshot_id,
                last_snapshot_id=record.last_snapshot_id,
                content_hash=record.content_hash,
                event_count=record.event_count,
                version=record.fingerprint_version,
            )
        )
    if record.data_quality is not None:
        message.data_quality.CopyFrom(quality_to_proto(record.data_quality))
    if record.run_start_time is not None:
        message.run_start_time.CopyFrom(timestamp(record.run_start_time))
    if record.run_end_time is not None:
        message.run_end_time.CopyFrom(timestamp(record.run_end_time))
    if record.sweep is not None:
        message.sweep.CopyFrom(_sweep_to_proto(record.sweep, record.strategy, registry))
    if equity_curve is not None:
        message.equity_curve.extend(
            pb.EquityPoint(time=timestamp(p.time), equity=dollars(p.equity)) for p in equity_curve
        )
    return message


def _duration(value: timedelta) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(value)
    return message


def quality_to_proto(quality: DataQuality) -> pb.DataQuality:
    """A run's gap report as ``DataQuality``."""
    return pb.DataQuality(
        gap_count=quality.gap_count,
        gap_time=_duration(quality.gap_time),
        unrecovered_gap_count=quality.unrecovered_gap_count,
        markets=[
            pb.MarketCoverage(
                ticker=m.ticker,
                coverage=m.coverage,
                gap_count=m.gap_count,
                gap_time=_duration(m.gap_time),
            )
            for m in quality.markets
        ],
    )


def execution_to_proto(record: ExecutionRecord) -> pb.Execution:
    """One execution as an ``Execution``."""
    return pb.Execution(
        sequence=record.sequence,
        ticker=record.ticker,
        time=timestamp(record.time),
        snapshot_id=record.snapshot_id,
        side=int(record.side),  # type: ignore[arg-type]
        action=int(record.action),  # type: ignore[arg-type]
        count=contracts(record.count),
        price=dollars(record.price),
        fee=dollars(record.fee),
        cash_after=dollars(record.cash_after),
        position_after=contracts(record.position_after),
        realized_pnl=dollars(record.realized_pnl),
    )


def _spec_to_proto(spec: ParameterSpec) -> pb.ParameterSpec:
    message = pb.ParameterSpec(name=spec.name, description=spec.description)
    message.type = int(spec.type)  # type: ignore[assignment]
    for field, value in (
        ("default_value", spec.default),
        ("minimum", spec.minimum),
        ("maximum", spec.maximum),
    ):
        if value is not None:
            getattr(message, field).CopyFrom(parameter_to_proto(value, spec.type))
    return message


def _require_id(value: str) -> str:
    return require_id(value, "backtest_id")


def _require_owner(record: BacktestRecord, action: str) -> None:
    """PERMISSION_DENIED unless the caller created ``record`` or is an admin (any RPC that
    changes or deletes a backtest calls this)."""
    caller = _caller()
    if record.created_by != caller.name and not caller.is_admin:
        raise PermissionDenied(
            f"backtest {record.backtest_id!r} belongs to another caller: {action} it needs the "
            "'admin' role"
        )


def _caller() -> Caller:
    """Who is calling (every BacktestService RPC passes the access-control interceptor)."""
    caller = current_caller()
    if caller is None:  # a bug: refuse rather than act for nobody
        raise PermissionDenied("the caller is unknown")
    return caller


class BacktestServicer(pb_grpc.BacktestServiceServicer):
    """Serves BacktestService from a ``BacktestRunner``. Holds no SQL and runs nothing itself."""

    def __init__(
        self,
        runner: BacktestRunner,
        tokens: RequestTokens,
        registry: StrategyRegistry = default_registry,
    ) -> None:
        self._runner = runner
        self._tokens = tokens
        self._registry = registry

    def _to_proto(
        self, record: BacktestRecord, equity_curve: list[EquityPointRecord] | None = None
    ) -> pb.Backtest:
        return backtest_to_proto(record, self._registry, equity_curve)

    async def ListStrategies(
        self, request: pb.ListStrategiesRequest, context: Context
    ) -> pb.ListStrategiesResponse:
        return pb.ListStrategiesResponse(
            strategies=[
                pb.Strategy(
                    name=cls.name,
                    description=cls.description,
                    parameters=[_spec_to_proto(spec) for spec in cls.parameters],
                )
                for cls in self._registry
            ]
        )

    async def CreateBacktest(
        self, request: pb.CreateBacktestRequest, context: Context
    ) -> pb.CreateBacktestResponse:
        config = config_from_proto(request.config)
        sweep = sweep_from_proto(request.sweep) if request.HasField("sweep") else None
        try:
            record = await self._runner.create(config, sweep, created_by=_caller().name)
        except ConfigError as error:
            raise InvalidArgument.field(_request_field(error.field), error.message) from None
        except UnknownMarkets as error:
            raise NotFound("market", error.tickers[0]) from None
        return pb.CreateBacktestResponse(backtest=self._to_proto(record))

    async def GetBacktest(
        self, request: pb.GetBacktestRequest, context: Context
    ) -> pb.GetBacktestResponse:
        backtest_id = _require_id(request.backtest_id)
        record = await self._runner.get(backtest_id)
        if record is None:
            raise NotFound("backtest", backtest_id)
        curve = None
        if request.view == pb.BACKTEST_VIEW_FULL:
            curve = await self._runner.equity_curve(backtest_id)
        return pb.GetBacktestResponse(backtest=self._to_proto(record, curve))

    async def ListBacktests(
        self, request: pb.ListBacktestsRequest, context: Context
    ) -> pb.ListBacktestsResponse:
        limit = BACKTESTS_PAGE.resolve(request.page_size)
        try:
            state = BacktestState(request.state) if request.state else None
        except ValueError:
            raise InvalidArgument.field("state", f"unknown value {request.state}") from None
        strategy = optional_name(request.strategy, "strategy") or None
        parent = (
            optional_name(request.parent_backtest_id, "parent_backtest_id", MAX_ID_LENGTH) or None
        )
        query = ("ListBacktests", strategy, int(state or 0), parent)
        cursor = self._tokens.decode_page_token(request.page_token, query, shape=(datetime, str))
        page = await self._runner.list(
            limit=limit,
            after=(cursor[0], cursor[1]) if cursor else None,  # type: ignore[arg-type]
            strategy=strategy,
            state=state,
            parent_backtest_id=parent,
        )
        return pb.ListBacktestsResponse(
            backtests=[self._to_proto(r) for r in page.items],
            next_page_token=self._tokens.encode_page_token(page.next_cursor, query),
        )

    async def ListExecutions(
        self, request: pb.ListExecutionsRequest, context: Context
    ) -> pb.ListExecutionsResponse:
        backtest_id = _require_id(request.backtest_id)
        limit = EXECUTIONS_PAGE.resolve(request.page_size)
        query = ("ListExecutions", backtest_id)
        cursor = self._tokens.decode_page_token(request.page_token, query, shape=(int,))
        after_sequence = cursor[0] if cursor else -1
        assert isinstance(after_sequence, int)  # decode_page_token checked the shape
        page = await self._runner.list_executions(
            backtest_id, limit=limit, after_sequence=after_sequence
        )
        if page is None:
            raise NotFound("backtest", backtest_id)
        return pb.ListExecutionsResponse(
            executions=[execution_to_proto(e) for e in page.items],
            next_page_token=self._tokens.encode_page_token(page.next_cursor, query),
        )

    async def WatchBacktest(
        self, request: pb.WatchBacktestRequest, context: Context
    ) -> AsyncIterator[pb.WatchBacktestResponse]:
        backtest_id = _require_id(request.backtest_id)
        interval = duration_seconds(
            request,
            "min_interval",
            default=DEFAULT_WATCH_INTERVAL,
            minimum=0.01,
            maximum=60.0,
        )
        changes = await self._runner.watch(backtest_id, interval or DEFAULT_WATCH_INTERVAL)
        if changes is None:
            raise NotFound("backtest", backtest_id)
        try:
            async for record in changes:
                yield pb.WatchBacktestResponse(backtest=self._to_proto(record))
        finally:
            # Ends the watch at once, also when the client goes away.
            await changes.aclose()

    async def CancelBacktest(
        self, request: pb.CancelBacktestRequest, context: Context
    ) -> pb.CancelBacktestResponse:
        backtest_id = _require_id(request.backtest_id)
        record = await self._runner.get(backtest_id)
        if record is None:
            raise NotFound("backtest", backtest_id)
        _require_owner(record, "cancelling")
        record = await self._runner.cancel(backtest_id)
        if record is None:
            raise NotFound("backtest", backtest_id)
        return pb.CancelBacktestResponse(backtest=self._to_proto(record))
