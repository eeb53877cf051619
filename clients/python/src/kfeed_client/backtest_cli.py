"""`kfeed backtest run|list|show|strategies`: BacktestService from the command line.

A client command like `tail` or `markets`: the same connection flags (``--server``, ``--token``,
``--tls``, ``--ca-file``, ``--cert-file``, ``--key-file``, each also ``KFEED_<FLAG>``) and the
async :class:`~kfeed_client.client.KfeedClient`. ``run`` creates a backtest (or a sweep), shows a
progress bar fed by WatchBacktest, prints the metrics and can plot the equity curve (``--plot``
needs matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import types_pb2
from kfeed_client.cli import (
    CliParser,
    ServerUnreachable,
    _add_connection_options,
    _connect,
    ensure_reachable,
    parse_time,
)
from kfeed_client.client import KfeedClient, to_timestamp
from kfeed_client.money import DOLLAR_SCALE


class UsageError(Exception):
    """A bad flag value, reported without a traceback (exit status 2)."""


# --- values --------------------------------------------------------------------------------------


def parse_dollars(text: str) -> int:
    """ "0.40", "$0.40" → 4000 (1/10,000 USD), exactly."""
    try:
        amount = Decimal(text.strip().lstrip("$")) * DOLLAR_SCALE
    except InvalidOperation:
        raise UsageError(f"not a dollar amount: {text!r}") from None
    if not amount.is_finite() or amount != amount.to_integral_value():
        raise UsageError(f"{text!r} is not a dollar amount with at most four decimals")
    return int(amount)


def format_dollars(ten_thousandths: int) -> str:
    """4000 → "$0.4000"; negative amounts as "-$1.2500"."""
    sign = "-" if ten_thousandths < 0 else ""
    return f"{sign}${Decimal(abs(ten_thousandths)) / DOLLAR_SCALE:,.4f}"


def parameter_value(text: str, spec: pb.ParameterSpec | None) -> pb.ParameterValue:
    """``text`` typed by the strategy's parameter schema (a string when the name is unknown:
    the server then names the parameter in its error)."""
    kind = spec.type if spec is not None else pb.PARAMETER_TYPE_STRING
    name = spec.name if spec is not None else text
    try:
        if kind == pb.PARAMETER_TYPE_INTEGER:
            return pb.ParameterValue(integer_value=int(text))
        if kind == pb.PARAMETER_TYPE_NUMBER:
            return pb.ParameterValue(number_value=float(text))
    except ValueError:
        raise UsageError(f"{name}: not a number: {text!r}") from None
    if kind == pb.PARAMETER_TYPE_DOLLARS:
        return pb.ParameterValue(
            dollars_value=types_pb2.Dollars(ten_thousandths=parse_dollars(text))
        )
    if kind == pb.PARAMETER_TYPE_BOOLEAN:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise UsageError(f"{name}: not a boolean: {text!r}")
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
    if not separator or not name.strip():
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
        ("fee rate", f"{config.taker_fee_rate_ten_thousandths / DOLLAR_SCALE:g}"),
        ("fee rounding", pb.FeeRounding.Name(config.fee_rounding)),
        ("fee schedule", config.fee_schedule_version or "-"),
        ("fill model", pb.FillModel.Name(config.fill_model).removeprefix("FILL_MODEL_")),
        ("latency", str(config.latency.ToTimedelta())),
        ("gap policy", pb.GapPolicy.Name(config.gap_policy).removeprefix("GAP_POLICY_")),
        ("rows read", f"{fingerprint.row_count:,}"),
        ("snapshot ids", f"{fingerprint.first_snapshot_id}..{fingerprint.last_snapshot_id}"),
        ("content hash (SHA-256)", fingerprint.content_hash or "-"),
        ("fingerprint version", str(fingerprint.version) if fingerprint.version else "-"),
        ("books and trades read", f"{fingerprint.event_count:,}"),
        *_quality_rows(backtest),
        ("code version", backtest.code_version),
    ]
    if backtest.parent_backtest_id:
        rows.append(("sweep", backtest.parent_backtest_id))
    if backtest.error_message:
        rows.append(("error", backtest.error_message))
    for name, value in rows:
        table.add_row(name, value)
    return table


def _quality_rows(backtest: pb.Backtest) -> list[tuple[str, str]]:
    if not backtest.HasField("data_quality"):
        return []
    quality = backtest.data_quality
    rows = [
        (
            "feed gaps",
            f"{quality.gap_count} ({quality.unrecovered_gap_count} unrecovered), "
            f"{quality.gap_time.ToTimedelta()}",
        )
    ]
    rows.extend(
        (f"  {m.ticker}", f"{m.coverage:.2%} covered, {m.gap_count} gaps") for m in quality.markets
    )
    return rows


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


# Execution markers: buys point up, sells down; settlements and end-of-window marks are dots.
_MARKERS: dict[int, tuple[str, str, str]] = {
    pb.ORDER_ACTION_BUY: ("^", "tab:green", "buy"),
    pb.ORDER_ACTION_SELL: ("v", "tab:red", "sell"),
    pb.ORDER_ACTION_SETTLE: ("o", "tab:gray", "settle"),
    pb.ORDER_ACTION_MARK: ("o", "tab:gray", "mark"),
}


def equity_figure(backtest: pb.Backtest, executions: Sequence[pb.Execution]) -> Any:
    """The equity curve in dollars (plain dollar ticks, never an offset such as "+1e3"), with a
    marker at each execution: a matplotlib Figure (needs matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")  # no display: files only
    import numpy  # a dependency of matplotlib
    from matplotlib import pyplot
    from matplotlib.ticker import StrMethodFormatter

    # Naive UTC datetimes as datetime64, which matplotlib plots on a date axis.
    times = numpy.array(
        [p.time.ToDatetime() for p in backtest.equity_curve], dtype="datetime64[us]"
    )
    equity = numpy.array(
        [p.equity.ten_thousandths / DOLLAR_SCALE for p in backtest.equity_curve], dtype=float
    )
    figure, axes = pyplot.subplots(figsize=(10, 4))
    axes.plot(times, equity, linewidth=1, color="tab:blue", label="equity")
    for action, (marker, color, label) in _MARKERS.items():
        at = numpy.array(
            [e.time.ToDatetime() for e in executions if e.action == action], dtype="datetime64[us]"
        )
        if len(at) and len(times):
            # Each execution sits on the curve: the equity at its time.
            level = numpy.interp(at.astype("int64"), times.astype("int64"), equity)
            axes.scatter(at, level, marker=marker, color=color, s=28, zorder=3, label=label)
    axes.yaxis.set_major_formatter(StrMethodFormatter("${x:,.2f}"))
    axes.set_title(f"{backtest.config.strategy} — backtest {backtest.backtest_id}")
    axes.set_ylabel("equity (USD)")
    axes.set_xlabel("time (UTC)")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.autofmt_xdate()
    figure.tight_layout()
    return figure


def plot_equity(backtest: pb.Backtest, executions: Sequence[pb.Execution], path: Path) -> None:
    """Writes :func:`equity_figure` as a PNG."""
    from matplotlib import pyplot

    figure = equity_figure(backtest, executions)
    figure.savefig(path, format="png")
    pyplot.close(figure)


# --- commands ------------------------------------------------------------------------------------


async def _backtests(
    client: KfeedClient, limit: int = 10_000, **filters: Any
) -> AsyncIterator[pb.Backtest]:
    token, seen = "", 0
    while seen < limit:
        page = await client.backtests.ListBacktests(
            pb.ListBacktestsRequest(page_size=min(500, limit - seen), page_token=token, **filters)
        )
        for backtest in page.backtests:
            yield backtest
        seen += len(page.backtests)
        token = page.next_page_token
        if not token:
            return


async def _executions(client: KfeedClient, backtest_id: str) -> list[pb.Execution]:
    executions: list[pb.Execution] = []
    token = ""
    while True:
        page = await client.backtests.ListExecutions(
            pb.ListExecutionsRequest(backtest_id=backtest_id, page_size=10_000, page_token=token)
        )
        executions.extend(page.executions)
        token = page.next_page_token
        if not token:
            return executions


async def _ranked_children(client: KfeedClient, parent: pb.Backtest) -> list[pb.Backtest]:
    by_id = {
        child.backtest_id: child
        async for child in _backtests(client, parent_backtest_id=parent.backtest_id)
    }
    return [by_id[i] for i in parent.ranked_child_ids if i in by_id]


async def folds_table(client: KfeedClient, parent: pb.Backtest) -> Table:
    """A walk-forward sweep: per fold, its windows, the best in-sample run (its parameters and
    ranking metric's PnL) and that configuration's out-of-sample PnL."""
    children = {
        child.backtest_id: child
        async for child in _backtests(client, parent_backtest_id=parent.backtest_id)
    }
    table = Table(title=f"walk-forward, best in-sample by {parent.sweep.rank_by}")
    for column in ("fold", "in-sample", "out-of-sample", "parameters", "IS PnL", "OOS PnL"):
        table.add_column(column, justify="right" if "PnL" in column else "left")

    def pnl(backtest_id: str) -> str:
        child = children.get(backtest_id)
        if child is None or not child.HasField("metrics"):
            return "-"
        return format_dollars(child.metrics.total_pnl.ten_thousandths)

    def moment(stamp: Timestamp) -> str:
        return stamp.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M:%S")

    for fold in parent.walk_forward_folds:
        best = children.get(fold.best_in_sample_backtest_id)
        chosen = {} if best is None else dict(best.config.parameters)
        table.add_row(
            str(fold.fold),
            f"{moment(fold.in_sample_start)} → {moment(fold.out_of_sample_start)}",
            f"{moment(fold.out_of_sample_start)} → {moment(fold.end)}",
            " ".join(f"{k}={format_parameter(v)}" for k, v in sorted(chosen.items())) or "-",
            pnl(fold.best_in_sample_backtest_id),
            pnl(fold.out_of_sample_backtest_id),
        )
    return table


def create_request(
    options: argparse.Namespace, strategies: Sequence[pb.Strategy]
) -> pb.CreateBacktestRequest:
    """The CreateBacktest request the flags of `run` describe."""
    specs = {
        spec.name: spec
        for strategy in strategies
        if strategy.name == options.strategy
        for spec in strategy.parameters
    }
    config = pb.BacktestConfig(strategy=options.strategy, tickers=options.ticker)
    for assignment in options.param:
        name, value = _split_assignment(assignment, "--param")
        config.parameters[name].CopyFrom(parameter_value(value, specs.get(name)))
    if options.start is not None:
        config.start_time.CopyFrom(to_timestamp(options.start))
    if options.end is not None:
        config.end_time.CopyFrom(to_timestamp(options.end))
    if options.initial_cash:
        config.initial_cash.ten_thousandths = parse_dollars(options.initial_cash)
    config.fill_model = pb.FillModel.Value(f"FILL_MODEL_{options.fill_model.upper()}")
    config.gap_policy = pb.GapPolicy.Value(f"GAP_POLICY_{options.gap_policy.upper()}")
    if options.latency_ms:
        config.latency.FromMilliseconds(options.latency_ms)
    request = pb.CreateBacktestRequest(config=config)
    if options.sweep:
        request.sweep.rank_by = options.rank_by or ""
        for assignment in options.sweep:
            name, values = _split_assignment(assignment, "--sweep")
            request.sweep.grid[name].values.extend(
                parameter_value(v, specs.get(name)) for v in values.split(",")
            )
    if options.walk_forward:
        if not options.sweep:
            raise UsageError("--walk-forward needs a grid (--sweep)")
        request.sweep.walk_forward.folds = options.walk_forward
        request.sweep.walk_forward.in_sample_fraction = options.in_sample_fraction
    return request


async def _watch(client: KfeedClient, backtest_id: str, console: Console) -> pb.Backtest:
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
        async for message in client.backtests.WatchBacktest(
            pb.WatchBacktestRequest(backtest_id=backtest_id)
        ):
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


async def run(options: argparse.Namespace, client: KfeedClient, console: Console) -> int:
    """`run`: create, watch to the end, print the metrics (the best child's for a sweep)."""
    strategies = (await client.backtests.ListStrategies(pb.ListStrategiesRequest())).strategies
    created = (await client.backtests.CreateBacktest(create_request(options, strategies))).backtest
    console.print(f"backtest [bold]{created.backtest_id}[/bold] created")
    final = await _watch(client, created.backtest_id, console)
    if final.state != pb.BACKTEST_STATE_SUCCEEDED:
        console.print(provenance_table(final))
        return 1
    full = await _get(client, final.backtest_id, full=True)
    if full.walk_forward_folds:
        console.print(await folds_table(client, full))
        if full.HasField("metrics"):
            # The folds' out-of-sample runs stitched into one.
            console.print(metrics_table(full))
        return 0
    if full.HasField("sweep"):
        ranked = await _ranked_children(client, full)
        console.print(backtests_table(ranked, f"sweep ranked by {full.sweep.rank_by}"))
        full = await _get(client, full.ranked_child_ids[0], full=True)
    console.print(metrics_table(full))
    if options.plot is not None:
        plot_equity(full, await _executions(client, full.backtest_id), options.plot)
        console.print(f"equity curve written to {options.plot}")
    return 0


async def _get(client: KfeedClient, backtest_id: str, *, full: bool = False) -> pb.Backtest:
    view = pb.BACKTEST_VIEW_FULL if full else pb.BACKTEST_VIEW_BASIC
    request = pb.GetBacktestRequest(backtest_id=backtest_id, view=view)
    return (await client.backtests.GetBacktest(request)).backtest


async def list_backtests(options: argparse.Namespace, client: KfeedClient, console: Console) -> int:
    """`list`: backtests newest first."""
    state = 0
    if options.state:
        try:
            state = pb.BacktestState.Value(f"BACKTEST_STATE_{options.state.upper()}")
        except ValueError:
            raise UsageError(f"--state: unknown state {options.state!r}") from None
    backtests = [
        b async for b in _backtests(client, options.limit, strategy=options.strategy, state=state)
    ]
    console.print(backtests_table(backtests, "backtests"))
    return 0


async def show(options: argparse.Namespace, client: KfeedClient, console: Console) -> int:
    """`show`: one backtest's metrics, configuration and data fingerprint."""
    backtest = await _get(client, options.backtest_id)
    if backtest.HasField("metrics"):
        console.print(metrics_table(backtest))
    console.print(provenance_table(backtest))
    if backtest.walk_forward_folds:
        console.print(await folds_table(client, backtest))
    if backtest.ranked_child_ids:
        ranked = await _ranked_children(client, backtest)
        console.print(backtests_table(ranked, f"sweep ranked by {backtest.sweep.rank_by}"))
    return 0


async def strategies(options: argparse.Namespace, client: KfeedClient, console: Console) -> int:
    """`strategies`: the strategies and their parameter schemas."""
    response = await client.backtests.ListStrategies(pb.ListStrategiesRequest())
    for strategy in response.strategies:
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
    return 0


# --- parsing -------------------------------------------------------------------------------------


def build_parser(prog: str = "kfeed backtest") -> argparse.ArgumentParser:
    """`run`, `list`, `show` and `strategies` as subcommands, each with the connection flags."""
    parser = CliParser(
        prog=prog, description="Run and inspect backtests on a kfeed server (BacktestService)."
    )
    commands = parser.add_subparsers(dest="backtest_command", required=True, metavar="COMMAND")
    run_parser = commands.add_parser("run", help="run a backtest (or a sweep) and print metrics")
    run_parser.add_argument("--strategy", required=True, help="see `kfeed backtest strategies`")
    run_parser.add_argument("--param", action="append", default=[], help="NAME=VALUE, repeatable")
    run_parser.add_argument(
        "--ticker", action="append", default=[], help="market ticker, repeatable"
    )
    run_parser.add_argument(
        "--from", dest="start", type=parse_time, help="window start (ISO-8601 or a span ago)"
    )
    run_parser.add_argument("--to", dest="end", type=parse_time, help="window end (exclusive)")
    run_parser.add_argument(
        "--sweep", action="append", default=[], help="NAME=V1,V2,... grid values, repeatable"
    )
    run_parser.add_argument("--rank-by", default="", help="metric ranking sweep runs (total_pnl)")
    run_parser.add_argument(
        "--walk-forward",
        type=int,
        default=0,
        metavar="FOLDS",
        help="walk-forward the sweep over FOLDS equal folds of the window (needs --from/--to)",
    )
    run_parser.add_argument(
        "--in-sample-fraction",
        type=float,
        default=0.7,
        help="share of each walk-forward fold that is in-sample (0.7)",
    )
    run_parser.add_argument("--initial-cash", default="", help="starting cash in dollars (1000)")
    run_parser.add_argument(
        "--fill-model",
        choices=("touch", "depth"),
        default="touch",
        help="takers fill at the touch, or walk the recorded book",
    )
    run_parser.add_argument(
        "--latency-ms", type=int, default=0, help="delay from decision to arrival, milliseconds"
    )
    run_parser.add_argument(
        "--gap-policy",
        choices=("flag", "refuse"),
        default="flag",
        help="refuse windows with unrecovered feed gaps, or run and report them",
    )
    run_parser.add_argument("--plot", type=Path, help="write the equity curve to this PNG")
    list_parser = commands.add_parser("list", help="list backtests, newest first")
    list_parser.add_argument("--strategy", default="", help="only this strategy")
    list_parser.add_argument("--state", default="", help="only this state (pending, running, …)")
    list_parser.add_argument("--limit", type=int, default=50, help="at most this many")
    show_parser = commands.add_parser("show", help="one backtest: metrics and provenance")
    show_parser.add_argument("backtest_id", metavar="BACKTEST_ID")
    strategies_parser = commands.add_parser("strategies", help="strategies and their parameters")
    for sub in (run_parser, list_parser, show_parser, strategies_parser):
        _add_connection_options(sub)
    return parser


_COMMANDS = {"run": run, "list": list_backtests, "show": show, "strategies": strategies}


async def execute(options: argparse.Namespace, console: Console | None = None) -> int:
    """Runs parsed options: gRPC errors exit 1 with one line, bad flag values exit 2."""
    console = console or Console(highlight=False)
    prog = getattr(options, "prog", "kfeed backtest")
    try:
        await ensure_reachable(options)
        async with _connect(options) as client:
            return await _COMMANDS[options.backtest_command](options, client, console)
    except ServerUnreachable as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as error:
        print(f"{prog}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except UsageError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2


def run_backtest(argv: Sequence[str], prog: str = "kfeed backtest") -> int:
    """`kfeed backtest run|list|show|strategies …` for the root command."""
    options = build_parser(prog).parse_args(argv)
    options.prog = prog
    try:
        return asyncio.run(execute(options))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
