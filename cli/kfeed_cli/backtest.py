"""`kfeed backtest run|list|show|strategies`: BacktestService from the command line.

A client like any internal service: the generated grpcio stubs over an insecure channel to
``--server`` (``KFEED_SERVER``, default 127.0.0.1:50051). ``run`` creates a backtest (or a sweep),
shows a progress bar fed by WatchBacktest, prints the metrics and can plot the equity curve.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np
from google.protobuf import timestamp_pb2
from pydantic import AliasChoices, BaseModel, Field
from pydantic_settings import CliApp, CliPositionalArg, CliSubCommand
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed.v1 import types_pb2
from kfeed_cli.settings import CommandSettings

DEFAULT_SERVER = "127.0.0.1:50051"
PRICE_SCALE = 10_000
_TERMINAL = (pb.BACKTEST_STATE_SUCCEEDED, pb.BACKTEST_STATE_FAILED, pb.BACKTEST_STATE_CANCELLED)

console = Console(highlight=False)


class UsageError(Exception):
    """A bad flag value, reported without a traceback."""


def _default_server() -> str:
    return os.environ.get("KFEED_SERVER", DEFAULT_SERVER)


# --- values --------------------------------------------------------------------------------------


def parse_dollars(text: str) -> int:
    """ "0.40", "$0.40" → 4000 (1/10,000 USD)."""
    try:
        amount = Decimal(text.strip().lstrip("$")) * PRICE_SCALE
    except InvalidOperation:
        raise UsageError(f"not a dollar amount: {text!r}") from None
    if amount != amount.to_integral_value():
        raise UsageError(f"{text!r} has more than four decimals")
    return int(amount)


def format_dollars(ten_thousandths: int) -> str:
    """4000 → "$0.4000"; negative amounts as "-$1.2500"."""
    sign = "-" if ten_thousandths < 0 else ""
    return f"{sign}${Decimal(abs(ten_thousandths)) / PRICE_SCALE:,.4f}"


def parse_time(text: str, flag: str) -> timestamp_pb2.Timestamp:
    """An ISO-8601 time (UTC when it has no offset)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag}: not an ISO-8601 time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(moment.astimezone(UTC))
    return message


def parameter_value(text: str, spec: pb.ParameterSpec | None) -> pb.ParameterValue:
    """``text`` typed by the strategy's parameter schema (a string when the name is unknown:
    the server then names the parameter in its error)."""
    kind = spec.type if spec is not None else pb.PARAMETER_TYPE_STRING
    try:
        if kind == pb.PARAMETER_TYPE_INTEGER:
            return pb.ParameterValue(integer_value=int(text))
        if kind == pb.PARAMETER_TYPE_NUMBER:
            return pb.ParameterValue(number_value=float(text))
    except ValueError:
        raise UsageError(f"{spec.name if spec else text}: not a number: {text!r}") from None
    if kind == pb.PARAMETER_TYPE_DOLLARS:
        return pb.ParameterValue(
            dollars_value=types_pb2.Dollars(ten_thousandths=parse_dollars(text))
        )
    if kind == pb.PARAMETER_TYPE_BOOLEAN:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise UsageError(f"{spec.name if spec else text}: not a boolean: {text!r}")
        return pb.ParameterValue(boolean_value=text.lower() in ("true", "1", "yes"))
    return pb.ParameterValue(string_value=text)


def format_parameter(value: pb.ParameterValue) -> str:
    """A parameter value as the CLI spells it."""
    kind = value.WhichOneof("kind")
    if kind == "dollars_value":
        return format_dollars(value.dollars_value.ten_thousandths)
    return "" if kind is None else str(getattr(value, kind))


def _split_assignment(text: str, flag: str) -> tuple[str, str]:
    name, separator, value = text.partition("=")
    if not separator or not name:
        raise UsageError(f"{flag} expects NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def _state_name(state: int) -> str:
    return pb.BacktestState.Name(state).removeprefix("BACKTEST_STATE_")  # type: ignore[arg-type]


# --- output --------------------------------------------------------------------------------------


def metrics_table(backtest: pb.Backtest) -> Table:
    """The metrics of a finished backtest."""
    m = backtest.metrics
    table = Table(title=f"backtest {backtest.backtest_id}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("total PnL", format_dollars(m.total_pnl.ten_thousandths)),
        ("return", f"{m.total_return:.4%}"),
        ("Sharpe (daily, ×√365)", f"{m.sharpe_ratio:.3f}"),
        ("Sortino (daily, ×√365)", f"{m.sortino_ratio:.3f}"),
        ("max drawdown", format_dollars(m.max_drawdown.ten_thousandths)),
        ("max drawdown fraction", f"{m.max_drawdown_fraction:.4%}"),
        ("max drawdown duration", str(m.max_drawdown_duration.ToTimedelta())),
        ("win rate", f"{m.win_rate:.2%}"),
        ("profit factor", f"{m.profit_factor:.3f}"),
        ("expectancy", format_dollars(m.expectancy.ten_thousandths)),
        ("trades", f"{m.trade_count:,}"),
        ("fees paid", format_dollars(m.fees_paid.ten_thousandths)),
        ("exposure", f"{m.exposure:.2%}"),
        ("Brier score", f"{m.brier_score:.4f}" if m.HasField("brier_score") else "-"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def provenance_table(backtest: pb.Backtest) -> Table:
    """Configuration, data fingerprint and code version."""
    config, fingerprint = backtest.config, backtest.data_fingerprint
    table = Table(title="provenance", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    start = config.start_time.ToDatetime(UTC).isoformat() if config.HasField("start_time") else "-"
    end = config.end_time.ToDatetime(UTC).isoformat() if config.HasField("end_time") else "-"
    rows = [
        ("state", _state_name(backtest.state)),
        ("strategy", config.strategy),
        *(
            (f"  {name}", format_parameter(value))
            for name, value in sorted(config.parameters.items())
        ),
        ("tickers", ", ".join(config.tickers)),
        ("window", f"[{start}, {end})"),
        ("initial cash", format_dollars(config.initial_cash.ten_thousandths)),
        ("fee rate", f"{config.taker_fee_rate_ten_thousandths / PRICE_SCALE:g}"),
        ("fee rounding", pb.FeeRounding.Name(config.fee_rounding)),
        ("rows read", f"{fingerprint.row_count:,}"),
        ("snapshot ids", f"{fingerprint.first_snapshot_id}..{fingerprint.last_snapshot_id}"),
        ("content hash (SHA-256)", fingerprint.content_hash or "-"),
        ("code version", backtest.code_version),
    ]
    if backtest.parent_backtest_id:
        rows.append(("sweep", backtest.parent_backtest_id))
    if backtest.error_message:
        rows.append(("error", backtest.error_message))
    for name, value in rows:
        table.add_row(name, value)
    return table


def backtests_table(backtests: Sequence[pb.Backtest], title: str) -> Table:
    """One line per backtest."""
    table = Table(title=title)
    for column in ("id", "strategy", "state", "created", "parameters", "PnL", "trades"):
        table.add_column(column, justify="right" if column in ("PnL", "trades") else "left")
    for b in backtests:
        finished = b.HasField("metrics")
        table.add_row(
            b.backtest_id,
            b.config.strategy + (" (sweep)" if b.HasField("sweep") else ""),
            _state_name(b.state),
            b.create_time.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            " ".join(f"{k}={format_parameter(v)}" for k, v in sorted(b.config.parameters.items())),
            format_dollars(b.metrics.total_pnl.ten_thousandths) if finished else "-",
            str(b.metrics.trade_count) if finished else "-",
        )
    return table


def plot_equity(backtest: pb.Backtest, path: Path) -> None:
    """Writes the equity curve as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib import pyplot

    # Naive UTC datetimes as datetime64, which matplotlib plots on a date axis.
    times = np.array([p.time.ToDatetime() for p in backtest.equity_curve], dtype="datetime64[us]")
    equity = [p.equity.ten_thousandths / PRICE_SCALE for p in backtest.equity_curve]
    figure, axes = pyplot.subplots(figsize=(10, 4))
    axes.plot(times, equity, linewidth=1)
    axes.set_title(f"{backtest.config.strategy} — backtest {backtest.backtest_id}")
    axes.set_ylabel("equity (USD)")
    axes.grid(alpha=0.3)
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, format="png")
    pyplot.close(figure)


# --- commands ------------------------------------------------------------------------------------


def _fail(error: grpc.RpcError) -> NoReturn:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    console.print(f"[red]error[/red]: {code.name if code else 'RPC failed'}: {details}")
    raise SystemExit(1)


class _ClientCommand(BaseModel):
    server: str = Field(default_factory=_default_server, description="kfeed server HOST:PORT")

    def _stub(self, channel: grpc.Channel) -> pb_grpc.BacktestServiceStub:
        return pb_grpc.BacktestServiceStub(channel)

    def cli_cmd(self) -> None:
        """Runs the command against ``--server``."""
        try:
            with grpc.insecure_channel(self.server) as channel:
                self.call(self._stub(channel))
        except grpc.RpcError as error:
            _fail(error)
        except UsageError as error:
            console.print(f"[red]error[/red]: {error}")
            raise SystemExit(2) from None

    def call(self, stub: pb_grpc.BacktestServiceStub) -> None:
        raise NotImplementedError


class RunBacktest(_ClientCommand):
    """Run a backtest (or a sweep with --sweep), show its progress and print its metrics."""

    strategy: str = Field(description="strategy name (see `kfeed backtest strategies`)")
    param: list[str] = Field(default_factory=list, description="NAME=VALUE, repeatable")
    ticker: list[str] = Field(default_factory=list, description="market ticker, repeatable")
    from_time: str = Field(
        default="",
        validation_alias=AliasChoices("from", "from_time"),
        description="window start, ISO-8601 (UTC unless it has an offset)",
    )
    to_time: str = Field(
        default="",
        validation_alias=AliasChoices("to", "to_time"),
        description="window end (exclusive), ISO-8601",
    )
    sweep: list[str] = Field(
        default_factory=list, description="NAME=V1,V2,... grid values, repeatable"
    )
    rank_by: str = Field(default="", description="metric ranking sweep children (total_pnl)")
    initial_cash: str = Field(default="", description="starting cash in dollars (1000)")
    plot: Path | None = Field(default=None, description="write the equity curve to this PNG")

    def request(self, strategies: Sequence[pb.Strategy]) -> pb.CreateBacktestRequest:
        """The CreateBacktest request the flags describe."""
        specs = {
            spec.name: spec
            for strategy in strategies
            if strategy.name == self.strategy
            for spec in strategy.parameters
        }
        config = pb.BacktestConfig(strategy=self.strategy, tickers=self.ticker)
        for assignment in self.param:
            name, value = _split_assignment(assignment, "--param")
            config.parameters[name].CopyFrom(parameter_value(value, specs.get(name)))
        if self.from_time:
            config.start_time.CopyFrom(parse_time(self.from_time, "--from"))
        if self.to_time:
            config.end_time.CopyFrom(parse_time(self.to_time, "--to"))
        if self.initial_cash:
            config.initial_cash.ten_thousandths = parse_dollars(self.initial_cash)
        request = pb.CreateBacktestRequest(config=config)
        if self.sweep:
            request.sweep.rank_by = self.rank_by
            for assignment in self.sweep:
                name, values = _split_assignment(assignment, "--sweep")
                request.sweep.grid[name].values.extend(
                    parameter_value(v, specs.get(name)) for v in values.split(",")
                )
        return request

    def call(self, stub: pb_grpc.BacktestServiceStub) -> None:
        strategies = stub.ListStrategies(pb.ListStrategiesRequest()).strategies
        created = stub.CreateBacktest(self.request(strategies)).backtest
        console.print(f"backtest [bold]{created.backtest_id}[/bold] created")
        final = self._watch(stub, created.backtest_id)
        if final.state != pb.BACKTEST_STATE_SUCCEEDED:
            console.print(provenance_table(final))
            raise SystemExit(1)
        full = stub.GetBacktest(
            pb.GetBacktestRequest(backtest_id=final.backtest_id, view=pb.BACKTEST_VIEW_FULL)
        ).backtest
        if full.HasField("sweep"):
            children = _all_backtests(stub, parent_backtest_id=full.backtest_id)
            by_id = {c.backtest_id: c for c in children}
            ranked = [by_id[i] for i in full.ranked_child_ids if i in by_id]
            console.print(backtests_table(ranked, f"sweep ranked by {full.sweep.rank_by}"))
            best = stub.GetBacktest(
                pb.GetBacktestRequest(
                    backtest_id=full.ranked_child_ids[0], view=pb.BACKTEST_VIEW_FULL
                )
            ).backtest
            full = best
        console.print(metrics_table(full))
        if self.plot is not None:
            plot_equity(full, self.plot)
            console.print(f"equity curve written to {self.plot}")

    def _watch(self, stub: pb_grpc.BacktestServiceStub, backtest_id: str) -> pb.Backtest:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
        )
        last = pb.Backtest()
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("pending", total=1.0, detail="")
            for message in stub.WatchBacktest(pb.WatchBacktestRequest(backtest_id=backtest_id)):
                last = message.backtest
                p = last.progress
                progress.update(
                    task,
                    completed=p.fraction_done,
                    description=_state_name(last.state).lower(),
                    detail=(
                        f"{p.snapshots_processed:,}/{p.snapshots_total:,} snapshots  "
                        f"PnL {format_dollars(p.interim_pnl.ten_thousandths)}"
                    ),
                )
        return last


def _all_backtests(
    stub: pb_grpc.BacktestServiceStub, limit: int = 10_000, **filters: Any
) -> list[pb.Backtest]:
    return list(_iter_backtests(stub, limit, **filters))


def _iter_backtests(
    stub: pb_grpc.BacktestServiceStub, limit: int, **filters: Any
) -> Iterator[pb.Backtest]:
    token, seen = "", 0
    while seen < limit:
        page = stub.ListBacktests(
            pb.ListBacktestsRequest(page_size=min(500, limit - seen), page_token=token, **filters)
        )
        yield from page.backtests
        seen += len(page.backtests)
        token = page.next_page_token
        if not token:
            return


class ListBacktests(_ClientCommand):
    """List backtests, newest first."""

    strategy: str = Field(default="", description="only this strategy")
    state: str = Field(default="", description="only this state (pending, running, succeeded, …)")
    limit: int = Field(default=50, description="at most this many")

    def call(self, stub: pb_grpc.BacktestServiceStub) -> None:
        state = 0
        if self.state:
            name = f"BACKTEST_STATE_{self.state.upper()}"
            try:
                state = pb.BacktestState.Value(name)
            except ValueError:
                raise UsageError(f"--state: unknown state {self.state!r}") from None
        backtests = _all_backtests(
            stub,
            self.limit,
            strategy=self.strategy,
            state=state,
        )
        console.print(backtests_table(backtests, "backtests"))


class ShowBacktest(_ClientCommand):
    """Show one backtest: metrics, configuration and data fingerprint."""

    backtest_id: CliPositionalArg[str]

    def call(self, stub: pb_grpc.BacktestServiceStub) -> None:
        backtest = stub.GetBacktest(pb.GetBacktestRequest(backtest_id=self.backtest_id)).backtest
        if backtest.HasField("metrics"):
            console.print(metrics_table(backtest))
        console.print(provenance_table(backtest))
        if backtest.ranked_child_ids:
            children = _all_backtests(stub, parent_backtest_id=backtest.backtest_id)
            by_id = {c.backtest_id: c for c in children}
            ranked = [by_id[i] for i in backtest.ranked_child_ids if i in by_id]
            console.print(backtests_table(ranked, f"sweep ranked by {backtest.sweep.rank_by}"))


class ListStrategies(_ClientCommand):
    """List the strategies and their parameters."""

    def call(self, stub: pb_grpc.BacktestServiceStub) -> None:
        for strategy in stub.ListStrategies(pb.ListStrategiesRequest()).strategies:
            table = Table(title=f"{strategy.name}: {strategy.description}", title_justify="left")
            for column in ("parameter", "type", "default", "range", "description"):
                table.add_column(column)
            for spec in strategy.parameters:
                low = format_parameter(spec.minimum) if spec.HasField("minimum") else ""
                high = format_parameter(spec.maximum) if spec.HasField("maximum") else ""
                table.add_row(
                    spec.name,
                    pb.ParameterType.Name(spec.type).removeprefix("PARAMETER_TYPE_").lower(),
                    format_parameter(spec.default_value)
                    if spec.HasField("default_value")
                    else "required",
                    f"{low}..{high}" if low or high else "",
                    spec.description,
                )
            console.print(table)


class BacktestCommand(CommandSettings):
    """Run and inspect backtests on the kfeed server (BacktestService)."""

    run: CliSubCommand[RunBacktest]
    list: CliSubCommand[ListBacktests]
    show: CliSubCommand[ShowBacktest]
    strategies: CliSubCommand[ListStrategies]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m kfeed_cli.backtest …` (until `kfeed backtest` is registered in main.py)."""
    BacktestCommand.model_config["cli_prog_name"] = "kfeed backtest"
    CliApp.run(BacktestCommand, cli_args=list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
