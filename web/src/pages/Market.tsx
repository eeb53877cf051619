import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { useQuery, useTransport } from "@connectrpc/connect-query";
import { keepPreviousData, useQuery as useTanstackQuery } from "@tanstack/react-query";
import {
  MarketService,
  type StreamOrderBooksResponse,
  type StreamSnapshotsResponse,
  type StreamTradesResponse,
} from "@gen/kfeed/v1/market_service_pb.js";
import {
  type Candle,
  type FeedGap,
  type MarketSnapshot,
  type PriceLevel,
  PriceLevelSchema,
  Side,
  type Trade,
} from "@gen/kfeed/v1/types_pb.js";
import {
  CandlestickSeries,
  createSeriesMarkers,
  LineSeries,
  type CandlestickData,
  type IChartApi,
  type ISeriesApi,
  type ISeriesMarkersPluginApi,
  type LineData,
  type Time,
  type UTCTimestamp,
} from "lightweight-charts";
import { useCallback, useEffect, useMemo, useRef, useState } from "react";
import { chartSeconds, makeChart } from "../components/charts";
import { Notice, StreamBadge } from "../components/Notice";
import { Time as TimeCell } from "../components/Time";
import { dollarsNumber, formatContracts, formatDollars, toDate } from "../format";
import { mergeGaps } from "../gaps";
import { useServerStream } from "../streams";
import { statusName } from "./Markets";

const INTERVALS = { "1m": 60, "1h": 3600, "1d": 86_400 } as const;
type IntervalName = keyof typeof INTERVALS;
const CANDLES_PER_PAGE = 500;
const INITIAL_CANDLES = 150;
const MAX_GAP_MARKERS = 10_000;
const HISTORY_SECONDS = 6 * 3600;
type PriceKind = "bid" | "ask" | "trades";

function candleBar(candle: Candle, kind: PriceKind): CandlestickData<Time> | undefined {
  const ohlc = kind === "bid" ? candle.yesBid : kind === "ask" ? candle.yesAsk : candle.price;
  const start = toDate(candle.startTime);
  if (!ohlc?.open || !ohlc.close || !ohlc.high || !ohlc.low || !start) return undefined;
  return {
    time: chartSeconds(start),
    open: dollarsNumber(ohlc.open)!,
    high: dollarsNumber(ohlc.high)!,
    low: dollarsNumber(ohlc.low)!,
    close: dollarsNumber(ohlc.close)!,
  };
}

function snapshotPrice(snapshot: MarketSnapshot, kind: PriceKind): number | undefined {
  const price = kind === "bid" ? snapshot.yesBid : kind === "ask" ? snapshot.yesAsk : snapshot.lastPrice;
  return price && price.tenThousandths > 0n ? dollarsNumber(price) : undefined;
}

/** Candles (ListCandles, scroll back for older pages), updated live, with feed-gap markers:
 * the stored gaps open in the loaded range (ListFeedGaps) and the live ones. */
function PriceChart({ ticker, snapshots, gaps: liveGaps }: {
  ticker: string;
  snapshots: MarketSnapshot[];
  gaps: FeedGap[];
}) {
  const transport = useTransport();
  const client = useMemo(() => createClient(MarketService, transport), [transport]);
  const [interval, setIntervalName] = useState<IntervalName>("1m");
  const [kind, setKind] = useState<PriceKind>("bid");
  const [candlesError, setCandlesError] = useState<unknown>();
  const [loaded, setLoaded] = useState(0);
  const container = useRef<HTMLDivElement>(null);
  const chart = useRef<IChartApi | undefined>(undefined);
  const candles = useRef<ISeriesApi<"Candlestick"> | undefined>(undefined);
  const line = useRef<ISeriesApi<"Line"> | undefined>(undefined);
  const markers = useRef<ISeriesMarkersPluginApi<Time> | undefined>(undefined);
  const bars = useRef<CandlestickData<Time>[]>([]);
  const oldestLoaded = useRef<Date | undefined>(undefined);
  const loading = useRef(false);
  const exhausted = useRef(false);
  const seconds = INTERVALS[interval];
  const [loadedSince, setLoadedSince] = useState<Date>();
  const storedGaps = useTanstackQuery({
    queryKey: ["feed-gaps", ticker, loadedSince?.getTime()],
    enabled: loadedSince !== undefined,
    placeholderData: keepPreviousData,
    retry: false,
    queryFn: async () => {
      const found: FeedGap[] = [];
      let pageToken = "";
      do {
        const page = await client.listFeedGaps({
          tickers: [ticker], startTime: timestampFromDate(loadedSince!), pageSize: 1000, pageToken,
        });
        found.push(...page.feedGaps);
        pageToken = page.nextPageToken;
      } while (pageToken && found.length < MAX_GAP_MARKERS);
      return found;
    },
  });
  const gaps = useMemo(() => mergeGaps(storedGaps.data ?? [], liveGaps), [storedGaps.data, liveGaps]);

  useEffect(() => {
    const element = container.current!;
    chart.current = makeChart(element, 360);
    candles.current = chart.current.addSeries(CandlestickSeries, {
      upColor: "#1a7f37", downColor: "#cf222e", wickUpColor: "#1a7f37", wickDownColor: "#cf222e", borderVisible: false,
    });
    line.current = chart.current.addSeries(LineSeries, { color: "#0969da", lineWidth: 2, visible: false });
    markers.current = createSeriesMarkers(candles.current, []);
    return () => {
      chart.current?.remove();
      chart.current = undefined;
    };
  }, []);

  // One window of candles older than `end`, prepended; true when there were any.
  const loadBefore = useCallback(async (end: Date): Promise<boolean> => {
    const start = new Date(end.getTime() - seconds * CANDLES_PER_PAGE * 1000);
    const older: CandlestickData<Time>[] = [];
    let pageToken = "";
    do {
      const page = await client.listCandles({
        ticker,
        startTime: timestampFromDate(start),
        endTime: timestampFromDate(end),
        interval: { seconds: BigInt(seconds) },
        pageSize: CANDLES_PER_PAGE,
        pageToken,
      });
      for (const candle of page.candles) {
        const bar = candleBar(candle, kind);
        if (bar) older.push(bar);
      }
      pageToken = page.nextPageToken;
    } while (pageToken);
    oldestLoaded.current = start;
    setLoadedSince(start);
    const known = new Set(bars.current.map((b) => b.time));
    bars.current = [...older.filter((b) => !known.has(b.time)), ...bars.current].sort(
      (a, b) => (a.time as number) - (b.time as number),
    );
    candles.current?.setData(bars.current);
    setLoaded(bars.current.length);
    return older.length > 0;
  }, [client, ticker, seconds, kind]);

  // (Re)load from now whenever the interval or price changes.
  useEffect(() => {
    let cancelled = false;
    bars.current = [];
    exhausted.current = false;
    setCandlesError(undefined);
    candles.current?.setData([]);
    loading.current = true;
    loadBefore(new Date(Date.now() + seconds * 1000))
      .then(() => {
        if (cancelled) return;
        // The newest candles, readable; older ones (and older pages) by scrolling back.
        const count = bars.current.length;
        if (count > INITIAL_CANDLES) chart.current?.timeScale().setVisibleLogicalRange({ from: count - INITIAL_CANDLES, to: count + 2 });
        else chart.current?.timeScale().fitContent();
      })
      .catch((error: unknown) => { if (!cancelled) setCandlesError(error); })
      .finally(() => { loading.current = false; });
    return () => { cancelled = true; };
  }, [loadBefore, seconds]);

  // Scroll back: near the left edge, fetch the window before the oldest loaded.
  useEffect(() => {
    const timeScale = chart.current?.timeScale();
    if (!timeScale) return;
    const onRange = (range: { from: number } | null) => {
      if (!range || range.from > 10 || loading.current || exhausted.current || !oldestLoaded.current) return;
      loading.current = true;
      loadBefore(oldestLoaded.current)
        .then((found) => { if (!found) exhausted.current = true; })
        .catch(() => { exhausted.current = true; })
        .finally(() => { loading.current = false; });
    };
    timeScale.subscribeVisibleLogicalRangeChange(onRange);
    return () => timeScale.unsubscribeVisibleLogicalRangeChange(onRange);
  }, [loadBefore]);

  const candlesMissing = candlesError !== undefined && ConnectError.from(candlesError).code === Code.Unimplemented;

  // Live: the newest snapshot moves the last candle; without candles, a line of snapshots.
  useEffect(() => {
    if (candlesMissing) {
      candles.current?.applyOptions({ visible: false });
      line.current?.applyOptions({ visible: true });
      const points: LineData<Time>[] = [];
      for (const snapshot of snapshots) {
        const value = snapshotPrice(snapshot, kind);
        const when = toDate(snapshot.exchangeTime);
        if (value === undefined || !when) continue;
        const time = chartSeconds(when);
        if (points.length && points[points.length - 1].time === time) points[points.length - 1] = { time, value };
        else if (!points.length || (points[points.length - 1].time as number) < time) points.push({ time, value });
      }
      const first = !line.current?.data().length;
      line.current?.setData(points);
      if (first && points.length) chart.current?.timeScale().fitContent();
      return;
    }
    const latest = snapshots[snapshots.length - 1];
    if (!latest || loading.current) return;
    const value = snapshotPrice(latest, kind);
    const when = toDate(latest.exchangeTime);
    if (value === undefined || !when) return;
    const bucket = (Math.floor(when.getTime() / 1000 / seconds) * seconds) as UTCTimestamp;
    const last = bars.current[bars.current.length - 1];
    if (last && (last.time as number) > bucket) return;
    const bar = last && last.time === bucket
      ? { ...last, high: Math.max(last.high, value), low: Math.min(last.low, value), close: value }
      : { time: bucket, open: value, high: value, low: value, close: value };
    if (last && last.time === bucket) bars.current[bars.current.length - 1] = bar;
    else bars.current.push(bar);
    candles.current?.update(bar);
  }, [snapshots, kind, seconds, candlesMissing]);

  useEffect(() => {
    const step = candlesMissing ? 1 : seconds;
    const snapped = gaps
      .map((gap) => toDate(gap.detectTime))
      .filter((d): d is Date => d !== undefined)
      .map((d) => ({
        time: (Math.floor(d.getTime() / 1000 / step) * step) as UTCTimestamp,
        position: "aboveBar" as const,
        color: "#cf222e",
        shape: "arrowDown" as const,
        text: "feed gap",
      }))
      .sort((a, b) => a.time - b.time);
    if (candlesMissing) {
      markers.current?.detach();
      if (line.current) markers.current = createSeriesMarkers(line.current, snapped);
    } else {
      markers.current?.setMarkers(snapped);
    }
  }, [gaps, seconds, candlesMissing]);

  return (
    <div className="panel" data-testid="price-chart" data-candles={loaded} data-points={snapshots.length}
      data-gaps={gaps.map((gap) => gap.gapId).join(" ")}>
      <div className="toolbar">
        <h2>Price</h2>
        {(Object.keys(INTERVALS) as IntervalName[]).map((name) => (
          <button key={name} className={name === interval ? "active" : ""} onClick={() => setIntervalName(name)}>
            {name}
          </button>
        ))}
        <select value={kind} onChange={(e) => setKind(e.target.value as PriceKind)} aria-label="price">
          <option value="bid">yes bid</option>
          <option value="ask">yes ask</option>
          <option value="trades">trades</option>
        </select>
        <span className="sub">{gaps.length ? `${gaps.length} feed gap(s) marked` : "no feed gaps"}</span>
      </div>
      {candlesMissing && (
        <p className="notice unavailable" data-testid="unavailable">
          Candles: not available on this server; showing stored snapshots of the last {HISTORY_SECONDS / 3600} h instead.
        </p>
      )}
      {candlesError !== undefined && !candlesMissing && <Notice error={candlesError} what="Candles" />}
      <div ref={container} className="chart" />
    </div>
  );
}

type Levels = Map<bigint, bigint>;

function levelsOf(levels: PriceLevel[]): Levels {
  return new Map(levels.map((l) => [l.price?.tenThousandths ?? 0n, l.size?.hundredths ?? 0n]));
}

/** The depth ladder: YES bids and NO bids, best first, live from StreamOrderBooks (in batches). */
function DepthLadder({ ticker }: { ticker: string }) {
  const transport = useTransport();
  const client = useMemo(() => createClient(MarketService, transport), [transport]);
  const [book, setBook] = useState<{ yes: Levels; no: Levels; inGap: boolean }>();
  // Updates applied (full books and level changes), and whether the stored past has been sent.
  const [applied, setApplied] = useState(0);
  const [caughtUp, setCaughtUp] = useState(false);
  const stream = useServerStream<StreamOrderBooksResponse>(
    `books/${ticker}`,
    (signal, resumeToken) =>
      client.streamOrderBooks(
        { tickers: [ticker], depth: 0, resumeToken, maxBatchSize: 500, heartbeatInterval: { seconds: 15n } },
        { signal },
      ),
    (message) => {
      if (message.event.case === "caughtUp") setCaughtUp(true);
      const updates = message.event.case === "batch"
        ? message.event.value.updates.map((u) => u.update)
        : [message.event];
      const count = updates.filter((u) => u.case === "book" || u.case === "change").length;
      if (!count) return;
      setApplied((n) => n + count);
      setBook((current) => {
        let next = current;
        for (const update of updates) {
          if (update.case === "book") {
            next = { yes: levelsOf(update.value.yesBids), no: levelsOf(update.value.noBids), inGap: update.value.inFeedGap };
          } else if (update.case === "change" && next) {
            const side = update.value.side === Side.YES ? new Map(next.yes) : new Map(next.no);
            const price = update.value.price?.tenThousandths ?? 0n;
            const size = update.value.size?.hundredths ?? 0n;
            if (size === 0n) side.delete(price);
            else side.set(price, size);
            next = update.value.side === Side.YES ? { ...next, yes: side } : { ...next, no: side };
          }
        }
        return next;
      });
    },
  );
  const rows = (levels: Levels | undefined) =>
    [...(levels ?? new Map<bigint, bigint>()).entries()].sort((a, b) => (b[0] > a[0] ? 1 : -1)).slice(0, 12);
  const yes = rows(book?.yes);
  const no = rows(book?.no);
  const largest = Number([...yes, ...no].reduce((m, [, s]) => (s > m ? s : m), 1n));
  const side = (title: string, levels: [bigint, bigint][], className: string) => (
    <table className={`ladder ${className}`}>
      <thead><tr><th>{title}</th><th className="num">size</th></tr></thead>
      <tbody>
        {levels.map(([price, size]) => (
          <tr key={String(price)}>
            <td className="num">{formatDollars(create(PriceLevelSchema, { price: { tenThousandths: price } }).price)}</td>
            <td className="num bar" style={{ ["--fill" as string]: `${(Number(size) / largest) * 100}%` }}>
              {formatContracts(size)}
            </td>
          </tr>
        ))}
      </tbody>
    </table>
  );
  return (
    <div className="panel" data-testid="depth" data-updates={applied}>
      <div className="toolbar"><h2>Depth</h2><StreamBadge state={stream.state} />{book?.inGap && <span className="badge stream-failed">in feed gap</span>}</div>
      {stream.state === "unavailable" ? (
        <p className="notice unavailable" data-testid="unavailable">Order books: not available on this server.</p>
      ) : !book && !caughtUp ? (
        <p className="sub">{stream.state === "failed" ? stream.error : "waiting for the book…"}</p>
      ) : yes.length + no.length === 0 ? (
        <p className="sub">no depth recorded for this market</p>
      ) : (
        <div className="ladders">{side("YES bid", yes, "yes")}{side("NO bid", no, "no")}</div>
      )}
    </div>
  );
}

/** Recent trades (ListTrades), newest first, then live from StreamTrades (or polled without it). */
function TradesTape({ ticker }: { ticker: string }) {
  const transport = useTransport();
  const client = useMemo(() => createClient(MarketService, transport), [transport]);
  const since = useMemo(() => timestampFromDate(new Date(Date.now() - 24 * 3600 * 1000)), []);
  const [live, setLive] = useState<Trade[]>([]);
  const stream = useServerStream<StreamTradesResponse>(
    `trades/${ticker}`,
    (signal, resumeToken) =>
      client.streamTrades({ tickers: [ticker], resumeToken, heartbeatInterval: { seconds: 15n } }, { signal }),
    (message) => {
      const trades = message.event.case === "trade" ? [message.event.value]
        : message.event.case === "tradeBatch" ? message.event.value.trades : [];
      if (trades.length) setLive((current) => [...[...trades].reverse(), ...current].slice(0, 200));
    },
  );
  const recent = useQuery(
    MarketService.method.listTrades,
    { ticker, startTime: since, pageSize: 10_000 },
    // Without StreamTrades on this server, poll instead.
    { refetchInterval: stream.state === "unavailable" ? 3000 : false },
  );
  const seen = new Set(live.map((t) => t.tradeId));
  const stored = [...(recent.data?.trades ?? [])].reverse().filter((t) => !seen.has(t.tradeId));
  const tape = [...live, ...stored].slice(0, 100);
  return (
    <div className="panel" data-testid="trades">
      <div className="toolbar"><h2>Trades</h2><StreamBadge state={stream.state === "unavailable" ? "polling" : stream.state} /></div>
      {stream.state === "unavailable" && <p className="sub">live trade stream not available on this server: polling</p>}
      {recent.error ? <Notice error={recent.error} what="Trades" /> : null}
      <table className="tape">
        <thead><tr><th>time</th><th className="num">yes price</th><th className="num">count</th><th>taker</th></tr></thead>
        <tbody>
          {tape.map((trade) => (
            <tr key={trade.tradeId} data-testid="trade-row" className={trade.takerSide === Side.YES ? "yes" : "no"}>
              <td><TimeCell value={trade.createTime} /></td>
              <td className="num">{formatDollars(trade.yesPrice)}</td>
              <td className="num">{formatContracts(trade.count)}</td>
              <td>{trade.takerSide === Side.YES ? "yes" : trade.takerSide === Side.NO ? "no" : "—"}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {recent.data && tape.length === 0 && <p className="sub">no trades in the last 24 h</p>}
    </div>
  );
}

export function MarketPage({ ticker }: { ticker: string }) {
  const transport = useTransport();
  const client = useMemo(() => createClient(MarketService, transport), [transport]);
  const market = useQuery(MarketService.method.getMarket, { ticker });
  const since = useMemo(() => timestampFromDate(new Date(Date.now() - HISTORY_SECONDS * 1000)), [ticker]);
  // Snapshots arrive by the thousand while history replays: collect them, render once a frame.
  const collected = useRef<MarketSnapshot[]>([]);
  const frame = useRef(0);
  const [snapshots, setSnapshots] = useState<MarketSnapshot[]>([]);
  const [gaps, setGaps] = useState<FeedGap[]>([]);
  useEffect(() => () => cancelAnimationFrame(frame.current), []);
  // History of the last hours (for the chart without candles), then live; new feed gaps. The
  // start goes with the resume token too: it still selects the snapshots after the token.
  const stream = useServerStream<StreamSnapshotsResponse>(
    `market/${ticker}`,
    (signal, resumeToken) =>
      client.streamSnapshots(
        { tickers: [ticker], startTime: since, resumeToken, maxBatchSize: 1000, heartbeatInterval: { seconds: 15n } },
        { signal },
      ),
    (message) => {
      const event = message.event;
      const fresh = event.case === "snapshot" && event.value.snapshot ? [event.value.snapshot]
        : event.case === "snapshotBatch" ? event.value.updates.flatMap((u) => (u.snapshot ? [u.snapshot] : []))
        : [];
      if (fresh.length) {
        collected.current.push(...fresh);
        if (!frame.current) {
          frame.current = requestAnimationFrame(() => {
            frame.current = 0;
            collected.current = collected.current.slice(-20_000);
            setSnapshots(collected.current.slice());
          });
        }
      }
      if (event.case === "feedGap" && (!event.value.ticker || event.value.ticker === ticker)) {
        const gap = event.value;
        setGaps((current) => [...current.filter((g) => g.gapId !== gap.gapId), gap]);
      }
    },
  );
  const latest = snapshots[snapshots.length - 1];
  const info = market.data?.market;
  return (
    <section>
      <div className="toolbar">
        <h1 data-testid="market-ticker">{ticker}</h1>
        <StreamBadge state={stream.state} />
      </div>
      {market.error ? <Notice error={market.error} what="Market" /> : null}
      {info && (
        <div className="facts">
          <span>{info.title}</span>
          <span>status <b>{statusName(latest?.status || info.status)}</b></span>
          <span>last <b data-testid="market-last">{formatDollars(latest?.lastPrice)}</b></span>
          <span>bid <b className="bid">{formatDollars(latest?.yesBid)}</b></span>
          <span>ask <b className="ask">{formatDollars(latest?.yesAsk)}</b></span>
          <span>closes <TimeCell value={info.closeTime} /></span>
          <span>event <a href={`#/markets`}>{info.eventTicker}</a></span>
        </div>
      )}
      <PriceChart ticker={ticker} snapshots={snapshots} gaps={gaps} />
      <div className="columns">
        <DepthLadder ticker={ticker} />
        <TradesTape ticker={ticker} />
      </div>
    </section>
  );
}
