import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { createClient } from "@connectrpc/connect";
import { useMutation, useQuery, useTransport } from "@connectrpc/connect-query";
import {
  type Backtest,
  BacktestService,
  BacktestState,
  BacktestView,
  CreateBacktestRequestSchema,
  OrderAction,
  ParameterSweepSchema,
  ParameterType,
  type ParameterSpec,
  type ParameterValue,
  ParameterValueSchema,
  type Strategy,
  type WatchBacktestResponse,
} from "@gen/kfeed/v1/backtest_service_pb.js";
import { MarketService } from "@gen/kfeed/v1/market_service_pb.js";
import { Side } from "@gen/kfeed/v1/types_pb.js";
import { useQueryClient } from "@tanstack/react-query";
import {
  AreaSeries,
  createSeriesMarkers,
  HistogramSeries,
  type SeriesMarker,
  type Time,
  type UTCTimestamp,
} from "lightweight-charts";
import { useEffect, useMemo, useRef, useState, type FormEvent } from "react";
import { chartSeconds, makeChart } from "../components/charts";
import { Notice, StreamBadge } from "../components/Notice";
import { Time as TimeCell } from "../components/Time";
import {
  dollarsNumber,
  formatContracts,
  formatDollars,
  formatNumber,
  formatPercent,
  parseDollars,
  toDate,
} from "../format";
import { href, navigate } from "../router";
import { useServerStream } from "../streams";

function stateName(state: BacktestState): string {
  return (BacktestState[state] ?? "UNSPECIFIED").toLowerCase();
}

const finished = (state: BacktestState) =>
  state === BacktestState.SUCCEEDED || state === BacktestState.FAILED || state === BacktestState.CANCELLED;

function formatParameter(value: ParameterValue | undefined): string {
  const kind = value?.kind;
  switch (kind?.case) {
    case "integerValue": return kind.value.toString();
    case "numberValue": return String(kind.value);
    case "dollarsValue": return formatDollars(kind.value);
    case "booleanValue": return kind.value ? "true" : "false";
    case "stringValue": return kind.value;
    default: return "—";
  }
}

function parameterValue(text: string, spec: ParameterSpec): ParameterValue {
  const trimmed = text.trim();
  switch (spec.type) {
    case ParameterType.INTEGER:
      if (!/^-?\d+$/.test(trimmed)) throw new Error(`${spec.name}: "${text}" is not an integer`);
      return create(ParameterValueSchema, { kind: { case: "integerValue", value: BigInt(trimmed) } });
    case ParameterType.NUMBER:
      if (trimmed === "" || !Number.isFinite(Number(trimmed))) throw new Error(`${spec.name}: "${text}" is not a number`);
      return create(ParameterValueSchema, { kind: { case: "numberValue", value: Number(trimmed) } });
    case ParameterType.DOLLARS:
      return create(ParameterValueSchema, {
        kind: { case: "dollarsValue", value: { tenThousandths: parseDollars(trimmed) } },
      });
    case ParameterType.BOOLEAN:
      if (!["true", "false"].includes(trimmed)) throw new Error(`${spec.name}: true or false`);
      return create(ParameterValueSchema, { kind: { case: "booleanValue", value: trimmed === "true" } });
    default:
      return create(ParameterValueSchema, { kind: { case: "stringValue", value: trimmed } });
  }
}

function defaultText(spec: ParameterSpec): string {
  const text = formatParameter(spec.defaultValue);
  return text === "—" ? "" : text.replace(/^\$/, "");
}

function localInput(date: Date): string {
  const shifted = new Date(date.getTime() - date.getTimezoneOffset() * 60_000);
  return shifted.toISOString().slice(0, 16);
}

/** Start a run, or a sweep (comma-separated values), from the strategy's parameter schema. */
function BacktestForm({ strategies }: { strategies: Strategy[] }) {
  const queryClient = useQueryClient();
  const [strategyName, setStrategyName] = useState(strategies[0]?.name ?? "");
  const strategy = strategies.find((s) => s.name === strategyName);
  const [values, setValues] = useState<Record<string, string>>({});
  const [swept, setSwept] = useState<Record<string, boolean>>({});
  const [tickers, setTickers] = useState<string[]>([]);
  const [from, setFrom] = useState(() => localInput(new Date(Date.now() - 24 * 3600 * 1000)));
  const [to, setTo] = useState(() => localInput(new Date(Date.now() + 60_000)));
  const [cash, setCash] = useState("1000");
  const [rankBy, setRankBy] = useState("total_pnl");
  const [formError, setFormError] = useState<string>();
  const markets = useQuery(MarketService.method.listMarkets, { pageSize: 1000 });
  const create_ = useMutation(BacktestService.method.createBacktest, {
    onSuccess: (response) => {
      void queryClient.invalidateQueries();
      if (response.backtest) navigate("backtests", response.backtest.backtestId);
    },
  });

  // The server needs at least one market: start with the first few listed.
  useEffect(() => {
    const listed = markets.data?.markets ?? [];
    if (listed.length) setTickers((current) => (current.length ? current : listed.slice(0, 3).map((m) => m.ticker)));
  }, [markets.data]);

  useEffect(() => {
    if (strategy) setValues(Object.fromEntries(strategy.parameters.map((p) => [p.name, defaultText(p)])));
    setSwept({});
  }, [strategy]);

  const submit = (event: FormEvent) => {
    event.preventDefault();
    setFormError(undefined);
    if (!strategy) return;
    try {
      const request = create(CreateBacktestRequestSchema, {
        config: {
          strategy: strategy.name,
          tickers,
          startTime: timestampFromDate(new Date(from)),
          endTime: timestampFromDate(new Date(to)),
          initialCash: { tenThousandths: parseDollars(cash) },
        },
      });
      const grid: Record<string, { values: ParameterValue[] }> = {};
      for (const spec of strategy.parameters) {
        const text = values[spec.name] ?? "";
        if (swept[spec.name]) {
          grid[spec.name] = { values: text.split(",").filter((v) => v.trim()).map((v) => parameterValue(v, spec)) };
        } else if (text.trim() !== "") {
          request.config!.parameters[spec.name] = parameterValue(text, spec);
        }
      }
      if (Object.keys(grid).length) request.sweep = create(ParameterSweepSchema, { grid, rankBy });
      create_.mutate(request);
    } catch (error) {
      setFormError(error instanceof Error ? error.message : String(error));
    }
  };

  return (
    <form className="panel backtest-form" onSubmit={submit} data-testid="backtest-form">
      <h2>New backtest</h2>
      <label>
        strategy
        <select value={strategyName} onChange={(e) => setStrategyName(e.target.value)} aria-label="strategy">
          {strategies.map((s) => <option key={s.name} value={s.name}>{s.name}</option>)}
        </select>
      </label>
      {strategy && <p className="sub">{strategy.description}</p>}
      <fieldset>
        <legend>parameters (tick “sweep” and give comma-separated values for a grid)</legend>
        {strategy?.parameters.map((spec) => (
          <label key={spec.name} title={spec.description}>
            {spec.name}
            <span className="sub">
              {ParameterType[spec.type]?.toLowerCase()}
              {spec.minimum ? ` ≥ ${formatParameter(spec.minimum)}` : ""}
              {spec.maximum ? ` ≤ ${formatParameter(spec.maximum)}` : ""}
            </span>
            <input
              name={spec.name}
              value={values[spec.name] ?? ""}
              onChange={(e) => setValues({ ...values, [spec.name]: e.target.value })}
              placeholder={swept[spec.name] ? "v1, v2, v3" : defaultText(spec)}
            />
            <span className="sweep">
              <input
                type="checkbox"
                checked={swept[spec.name] ?? false}
                onChange={(e) => setSwept({ ...swept, [spec.name]: e.target.checked })}
                aria-label={`sweep ${spec.name}`}
              />
              sweep
            </span>
          </label>
        ))}
      </fieldset>
      <label>
        markets (one or more; Ctrl-click to add)
        <select
          multiple
          size={6}
          value={tickers}
          onChange={(e) => setTickers([...e.target.selectedOptions].map((o) => o.value))}
          aria-label="markets"
        >
          {(markets.data?.markets ?? []).map((m) => <option key={m.ticker} value={m.ticker}>{m.ticker}</option>)}
        </select>
      </label>
      <label>from <input type="datetime-local" value={from} onChange={(e) => setFrom(e.target.value)} aria-label="from" /></label>
      <label>to <input type="datetime-local" value={to} onChange={(e) => setTo(e.target.value)} aria-label="to" /></label>
      <label>initial cash ($) <input value={cash} onChange={(e) => setCash(e.target.value)} aria-label="initial cash" /></label>
      {Object.values(swept).some(Boolean) && (
        <label>rank sweep by <input value={rankBy} onChange={(e) => setRankBy(e.target.value)} aria-label="rank by" /></label>
      )}
      {/* No market chosen (the list still loading, or all deselected): a Run could only be refused. */}
      <button type="submit" disabled={create_.isPending || tickers.length === 0} title={tickers.length ? undefined : "choose at least one market"}>Run</button>
      {formError && <p className="notice error">{formError}</p>}
      {create_.error ? <Notice error={create_.error} what="Create backtest" /> : null}
    </form>
  );
}

const METRICS: [string, (b: Backtest) => string][] = [
  ["total PnL", (b) => formatDollars(b.metrics?.totalPnl)],
  ["return", (b) => formatPercent(b.metrics?.totalReturn, 2)],
  ["Sharpe", (b) => formatNumber(b.metrics?.sharpeRatio)],
  ["Sortino", (b) => formatNumber(b.metrics?.sortinoRatio)],
  ["max drawdown", (b) => `${formatDollars(b.metrics?.maxDrawdown)} (${formatPercent(b.metrics?.maxDrawdownFraction)})`],
  ["win rate", (b) => formatPercent(b.metrics?.winRate)],
  ["profit factor", (b) => formatNumber(b.metrics?.profitFactor)],
  ["expectancy", (b) => formatDollars(b.metrics?.expectancy)],
  ["trades", (b) => b.metrics?.tradeCount.toString() ?? "—"],
  ["fees", (b) => formatDollars(b.metrics?.feesPaid)],
  ["exposure", (b) => formatPercent(b.metrics?.exposure)],
  ["Brier score", (b) => formatNumber(b.metrics?.brierScore, 4)],
];

function BacktestList() {
  const list = useQuery(BacktestService.method.listBacktests, { pageSize: 100 }, { refetchInterval: 3000 });
  const [compare, setCompare] = useState<string[]>([]);
  const backtests = list.data?.backtests ?? [];
  const compared = backtests.filter((b) => compare.includes(b.backtestId));
  return (
    <div className="panel">
      <h2>Runs</h2>
      {list.error ? <Notice error={list.error} what="Backtests" /> : null}
      <table data-testid="backtest-list">
        <thead>
          <tr><th>compare</th><th>run</th><th>strategy</th><th>state</th><th className="num">progress</th><th className="num">PnL</th><th>created</th></tr>
        </thead>
        <tbody>
          {backtests.map((b) => (
            <tr key={b.backtestId}>
              <td>
                <input
                  type="checkbox"
                  checked={compare.includes(b.backtestId)}
                  onChange={(e) => setCompare(e.target.checked ? [...compare, b.backtestId] : compare.filter((id) => id !== b.backtestId))}
                  aria-label={`compare ${b.backtestId}`}
                />
              </td>
              <td><a href={href("backtests", b.backtestId)}>{b.backtestId.slice(0, 8)}</a>{b.parentBacktestId ? <span className="sub"> (sweep child)</span> : null}</td>
              <td>{b.config?.strategy}</td>
              <td className={`state-${stateName(b.state)}`}>{stateName(b.state)}</td>
              <td className="num">{formatPercent(b.progress?.fractionDone, 0)}</td>
              <td className="num">{formatDollars(b.metrics?.totalPnl)}</td>
              <td><TimeCell value={b.createTime} /></td>
            </tr>
          ))}
        </tbody>
      </table>
      {compared.length > 1 && (
        <table className="compare" data-testid="compare">
          <thead><tr><th>metric</th>{compared.map((b) => <th key={b.backtestId}>{b.backtestId.slice(0, 8)} {b.config?.strategy}</th>)}</tr></thead>
          <tbody>
            <tr><td>parameters</td>{compared.map((b) => (
              <td key={b.backtestId}>{Object.entries(b.config?.parameters ?? {}).map(([k, v]) => `${k}=${formatParameter(v)}`).join(", ") || "defaults"}</td>
            ))}</tr>
            {METRICS.map(([name, value]) => (
              <tr key={name}><td>{name}</td>{compared.map((b) => <td key={b.backtestId} className="num">{value(b)}</td>)}</tr>
            ))}
          </tbody>
        </table>
      )}
      {compared.length === 1 && <p className="sub">tick another run to compare</p>}
    </div>
  );
}

/** Equity (area), drawdown (histogram below) and executions (markers). */
function EquityChart({ backtest, executions }: { backtest: Backtest; executions: { time: Date; text: string; buy: boolean }[] }) {
  const container = useRef<HTMLDivElement>(null);
  useEffect(() => {
    const chart = makeChart(container.current!, 320);
    const equity = chart.addSeries(AreaSeries, { lineColor: "#0969da", topColor: "rgba(9,105,218,0.25)", bottomColor: "rgba(9,105,218,0.02)", lineWidth: 2 });
    const drawdown = chart.addSeries(HistogramSeries, { color: "rgba(207,34,46,0.45)", priceScaleId: "drawdown" });
    chart.priceScale("drawdown").applyOptions({ scaleMargins: { top: 0.75, bottom: 0 } });
    const points: { time: UTCTimestamp; value: number }[] = [];
    for (const point of backtest.equityCurve) {
      const when = toDate(point.time);
      const value = dollarsNumber(point.equity);
      if (!when || value === undefined) continue;
      const time = chartSeconds(when);
      if (points.length && points[points.length - 1].time >= time) points[points.length - 1] = { time: points[points.length - 1].time, value };
      else points.push({ time, value });
    }
    let peak = -Infinity;
    equity.setData(points);
    drawdown.setData(points.map((p) => {
      peak = Math.max(peak, p.value);
      return { time: p.time, value: p.value - peak };
    }));
    const times = points.map((p) => p.time);
    const snap = (t: UTCTimestamp) => times.find((x) => x >= t) ?? times[times.length - 1];
    const markers: SeriesMarker<Time>[] = executions
      .filter(() => times.length > 0)
      .map((e) => ({
        time: snap(chartSeconds(e.time)),
        position: e.buy ? ("belowBar" as const) : ("aboveBar" as const),
        color: e.buy ? "#1a7f37" : "#cf222e",
        shape: e.buy ? ("arrowUp" as const) : ("arrowDown" as const),
        text: e.text,
      }))
      .sort((a, b) => (a.time as number) - (b.time as number));
    createSeriesMarkers(equity, markers);
    chart.timeScale().fitContent();
    return () => chart.remove();
  }, [backtest, executions]);
  return <div ref={container} className="chart" data-testid="equity-chart" data-points={backtest.equityCurve.length} />;
}

function BacktestDetail({ backtestId }: { backtestId: string }) {
  const transport = useTransport();
  const client = useMemo(() => createClient(BacktestService, transport), [transport]);
  const queryClient = useQueryClient();
  const [watched, setWatched] = useState<Backtest>();
  const watch = useServerStream<WatchBacktestResponse & { resumeToken?: string }>(
    `watch/${backtestId}`,
    (signal) => client.watchBacktest({ backtestId, minInterval: { nanos: 200_000_000 } }, { signal }),
    (message) => { if (message.backtest) setWatched(message.backtest); },
    true,
    (message) => message.backtest !== undefined && finished(message.backtest.state),
  );
  const done = watched !== undefined && finished(watched.state);
  const full = useQuery(
    BacktestService.method.getBacktest,
    { backtestId, view: BacktestView.FULL },
    { enabled: done },
  );
  const executions = useQuery(
    BacktestService.method.listExecutions,
    { backtestId, pageSize: 10_000 },
    { enabled: done },
  );
  const cancel = useMutation(BacktestService.method.cancelBacktest, {
    onSuccess: () => void queryClient.invalidateQueries(),
  });
  const backtest = full.data?.backtest ?? watched;
  const markers = useMemo(
    () => (executions.data?.executions ?? [])
      .filter((e) => e.action === OrderAction.BUY || e.action === OrderAction.SELL)
      .flatMap((e) => {
        const time = toDate(e.time);
        return time ? [{ time, buy: e.action === OrderAction.BUY, text: `${e.action === OrderAction.BUY ? "buy" : "sell"} ${e.side === Side.YES ? "yes" : "no"}` }] : [];
      }),
    [executions.data],
  );
  if (!backtest) {
    return <div className="panel"><StreamBadge state={watch.state} />{watch.error && <p className="notice error">{watch.error}</p>}</div>;
  }
  const fraction = backtest.progress?.fractionDone ?? 0;
  return (
    <div className="panel" data-testid="backtest-detail" data-state={stateName(backtest.state)}>
      <div className="toolbar">
        <h2>Run {backtest.backtestId}</h2>
        <span className={`badge state-${stateName(backtest.state)}`} data-testid="backtest-state">{stateName(backtest.state)}</span>
        {!finished(backtest.state) && (
          <button onClick={() => cancel.mutate({ backtestId })} disabled={cancel.isPending}>Cancel</button>
        )}
      </div>
      <div className="progress" data-testid="progress" data-fraction={fraction.toFixed(3)}>
        <div style={{ width: `${Math.round(fraction * 100)}%` }} />
        <span>
          {formatPercent(fraction, 0)} · {backtest.progress?.snapshotsProcessed.toString() ?? 0} of {backtest.progress?.snapshotsTotal.toString() ?? "?"} snapshots · interim PnL {formatDollars(backtest.progress?.interimPnl)}
        </span>
      </div>
      {backtest.errorMessage && <p className="notice error">{backtest.errorMessage}</p>}
      {backtest.rankedChildIds.length > 0 && (
        <p>sweep children, best first ({backtest.sweep?.rankBy}):{" "}
          {backtest.rankedChildIds.map((id) => <a key={id} href={href("backtests", id)}>{id.slice(0, 8)} </a>)}
        </p>
      )}
      {done && backtest.equityCurve.length > 0 && <EquityChart backtest={backtest} executions={markers} />}
      {done && (
        <table className="metrics">
          <tbody>{METRICS.map(([name, value]) => <tr key={name}><td>{name}</td><td className="num">{value(backtest)}</td></tr>)}</tbody>
        </table>
      )}
      <h3>Provenance</h3>
      <table className="provenance" data-testid="provenance">
        <tbody>
          <tr><td>strategy</td><td>{backtest.config?.strategy}</td></tr>
          <tr><td>parameters</td><td>{Object.entries(backtest.config?.parameters ?? {}).map(([k, v]) => `${k}=${formatParameter(v)}`).join(", ") || "defaults"}</td></tr>
          <tr><td>markets</td><td>{backtest.config?.tickers.join(", ") || "all"}</td></tr>
          <tr><td>window</td><td><TimeCell value={backtest.config?.startTime} /> → <TimeCell value={backtest.config?.endTime} /></td></tr>
          <tr><td>initial cash</td><td>{formatDollars(backtest.config?.initialCash)}</td></tr>
          <tr><td>fees</td><td>{backtest.config?.takerFeeRateTenThousandths.toString()} / 10,000 taker rate</td></tr>
          <tr><td>data fingerprint</td><td><code>{backtest.dataFingerprint?.contentHash || "—"}</code> ({backtest.dataFingerprint?.rowCount.toString() ?? 0} rows, ids {backtest.dataFingerprint?.firstSnapshotId.toString()}–{backtest.dataFingerprint?.lastSnapshotId.toString()}, version {backtest.dataFingerprint?.version ?? "—"})</td></tr>
          <tr><td>code version</td><td><code>{backtest.codeVersion}</code></td></tr>
          <tr><td>created / ran</td><td><TimeCell value={backtest.createTime} /> · <TimeCell value={backtest.runStartTime} /> → <TimeCell value={backtest.runEndTime} /></td></tr>
        </tbody>
      </table>
      {done && (
        <>
          <h3>Executions</h3>
          {executions.error ? <Notice error={executions.error} what="Executions" /> : null}
          <table className="executions" data-testid="executions">
            <thead><tr><th>#</th><th>time</th><th>market</th><th>action</th><th>side</th><th className="num">count</th><th className="num">price</th><th className="num">fee</th><th className="num">cash after</th><th className="num">realized PnL</th></tr></thead>
            <tbody>
              {(executions.data?.executions ?? []).slice(0, 500).map((e) => (
                <tr key={e.sequence.toString()}>
                  <td>{e.sequence.toString()}</td><td><TimeCell value={e.time} /></td><td>{e.ticker}</td>
                  <td>{(OrderAction[e.action] ?? "").toLowerCase()}</td><td>{e.side === Side.YES ? "yes" : e.side === Side.NO ? "no" : "—"}</td>
                  <td className="num">{formatContracts(e.count)}</td><td className="num">{formatDollars(e.price)}</td><td className="num">{formatDollars(e.fee)}</td>
                  <td className="num">{formatDollars(e.cashAfter)}</td><td className="num">{formatDollars(e.realizedPnl)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </>
      )}
    </div>
  );
}

export function BacktestsPage({ backtestId }: { backtestId?: string }) {
  const strategies = useQuery(BacktestService.method.listStrategies, {});
  return (
    <section>
      <div className="toolbar"><h1>Backtests</h1>{backtestId && <a href={href("backtests")}>all runs</a>}</div>
      {backtestId ? (
        <BacktestDetail key={backtestId} backtestId={backtestId} />
      ) : (
        <div className="columns">
          {strategies.error ? <Notice error={strategies.error} what="Strategies" /> : null}
          {strategies.data && <BacktestForm strategies={strategies.data.strategies} />}
          <BacktestList />
        </div>
      )}
    </section>
  );
}
