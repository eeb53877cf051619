import { createClient } from "@connectrpc/connect";
import { useInfiniteQuery, useQuery, useTransport } from "@connectrpc/connect-query";
import { MarketService, type StreamSnapshotsResponse } from "@gen/kfeed/v1/market_service_pb.js";
import { MarketStatus, type Market } from "@gen/kfeed/v1/types_pb.js";
import { memo, useEffect, useMemo, useRef, useState } from "react";
import { Notice, StreamBadge } from "../components/Notice";
import { Sparkline } from "../components/Sparkline";
import { Time } from "../components/Time";
import { formatContracts, formatDollars, toDate } from "../format";
import { LiveBoard, useLiveRow } from "../live";
import { href } from "../router";
import { useServerStream } from "../streams";

const STATUSES = [
  MarketStatus.UNOPENED,
  MarketStatus.OPEN,
  MarketStatus.PAUSED,
  MarketStatus.CLOSED,
  MarketStatus.DETERMINED,
  MarketStatus.FINALIZED,
];

export function statusName(status: MarketStatus): string {
  return (MarketStatus[status] ?? "UNSPECIFIED").toLowerCase();
}

const MarketRow = memo(function MarketRow({ market, board }: { market: Market; board: LiveBoard }) {
  const live = useLiveRow(board, market.ticker);
  const snapshot = live?.snapshot;
  return (
    <tr data-testid="market-row" data-ticker={market.ticker}>
      <td>
        <a href={href("market", market.ticker)}>{market.ticker}</a>
        <div className="sub">{market.title}</div>
      </td>
      <td>{statusName(snapshot?.status || market.status)}</td>
      {/* key: a new span restarts the flash animation on every update */}
      <td className="num" data-testid="last">
        <span key={String(snapshot?.snapshotId ?? 0)} className={snapshot ? "flash" : ""}>
          {formatDollars(snapshot?.lastPrice)}
        </span>
      </td>
      <td className="num bid" data-testid="bid">{formatDollars(snapshot?.yesBid)}</td>
      <td className="num ask" data-testid="ask">{formatDollars(snapshot?.yesAsk)}</td>
      <td className="num">{formatContracts(snapshot?.volume)}</td>
      <td><Sparkline values={live?.spark ?? []} /></td>
      <td className="time"><Time date={toDate(snapshot?.exchangeTime)} /></td>
    </tr>
  );
});

export function MarketsPage() {
  const transport = useTransport();
  const [search, setSearch] = useState("");
  const [series, setSeries] = useState("");
  const [event, setEvent] = useState("");
  const [status, setStatus] = useState<MarketStatus>(MarketStatus.OPEN);
  const seriesList = useQuery(MarketService.method.listSeries, { pageSize: 1000 });
  const events = useQuery(MarketService.method.listEvents, { pageSize: 1000, seriesTicker: series });
  // Pages of 500 (AIP-158 tokens), more on demand: Kalshi lists many thousands of markets.
  const markets = useInfiniteQuery(
    MarketService.method.listMarkets,
    { pageSize: 500, pageToken: "", seriesTicker: series, eventTicker: event, statuses: status ? [status] : [] },
    { pageParamKey: "pageToken", getNextPageParam: (page) => page.nextPageToken || undefined },
  );
  const listed = useMemo(() => (markets.data?.pages ?? []).flatMap((page) => page.markets), [markets.data]);
  // Markets the live feed mentions that the list does not have yet: list again (at most every 2 s).
  const known = useMemo(() => new Set(listed.map((m) => m.ticker)), [listed]);
  const lastRefetch = useRef(0);
  const noticeTicker = (ticker: string) => {
    if (known.has(ticker) || markets.isFetching || performance.now() - lastRefetch.current < 2000) return;
    // A filtered or partly loaded list need not hold every ticker.
    if (series || event || status !== MarketStatus.OPEN || markets.hasNextPage) return;
    lastRefetch.current = performance.now();
    void markets.refetch();
  };
  const board = useMemo(() => new LiveBoard(), []);
  useEffect(() => () => board.dispose(), [board]);
  const client = useMemo(() => createClient(MarketService, transport), [transport]);

  const stream = useServerStream<StreamSnapshotsResponse>(
    `snapshots/${series}/${event}`,
    (signal, resumeToken) =>
      client.streamSnapshots(
        {
          seriesTicker: series,
          eventTicker: event,
          includeLatest: !resumeToken,
          resumeToken,
          maxBatchSize: 500,
          heartbeatInterval: { seconds: 15n },
        },
        { signal },
      ),
    (message) => {
      const updates = message.event.case === "snapshot" ? [message.event.value]
        : message.event.case === "snapshotBatch" ? message.event.value.updates : [];
      for (const update of updates) {
        if (!update.snapshot) continue;
        board.apply(update.snapshot);
        noticeTicker(update.snapshot.ticker);
      }
    },
  );

  const [updates, setUpdates] = useState(0);
  useEffect(() => {
    const timer = setInterval(() => setUpdates(board.applied), 1000);
    return () => clearInterval(timer);
  }, [board]);

  // Series and events when the server lists them; otherwise what the markets say.
  const seriesOptions = seriesList.data
    ? seriesList.data.series.map((s) => s.ticker)
    : [...new Set(listed.map((m) => m.seriesTicker))].sort();
  const eventOptions = events.data
    ? events.data.events.map((e) => e.eventTicker)
    : [...new Set(listed.map((m) => m.eventTicker))].sort();
  const needle = search.trim().toLowerCase();
  const shown = listed.filter(
    (m) => !needle || m.ticker.toLowerCase().includes(needle) || m.title.toLowerCase().includes(needle),
  );

  return (
    <section>
      <div className="toolbar">
        <h1>Markets</h1>
        <input
          type="search"
          placeholder="search ticker or title"
          value={search}
          onChange={(e) => setSearch(e.target.value)}
          aria-label="search"
        />
        <select value={series} onChange={(e) => { setSeries(e.target.value); setEvent(""); }} aria-label="series">
          <option value="">all series</option>
          {seriesOptions.map((s) => <option key={s} value={s}>{s}</option>)}
        </select>
        <select value={event} onChange={(e) => setEvent(e.target.value)} aria-label="event">
          <option value="">all events</option>
          {eventOptions.map((e) => <option key={e} value={e}>{e}</option>)}
        </select>
        <select value={status} onChange={(e) => setStatus(Number(e.target.value))} aria-label="status">
          <option value={MarketStatus.UNSPECIFIED}>any status</option>
          {STATUSES.map((s) => <option key={s} value={s}>{statusName(s)}</option>)}
        </select>
        <StreamBadge state={stream.state} />
        <span className="sub" data-testid="updates-count">{updates} updates</span>
      </div>
      {markets.error ? <Notice error={markets.error} what="Markets" /> : null}
      {stream.state === "unavailable" && <p className="notice unavailable">Live prices: not available on this server.</p>}
      <table className="markets" data-testid="markets-table">
        <thead>
          <tr>
            <th>market</th><th>status</th><th className="num">last</th><th className="num">yes bid</th>
            <th className="num">yes ask</th><th className="num">volume</th><th>trend</th><th>updated</th>
          </tr>
        </thead>
        <tbody>
          {shown.map((m) => <MarketRow key={m.ticker} market={m} board={board} />)}
        </tbody>
      </table>
      {markets.hasNextPage && (
        <button onClick={() => void markets.fetchNextPage()} disabled={markets.isFetchingNextPage}>
          load more markets
        </button>
      )}
      {markets.isPending && <p className="sub">loading…</p>}
      {markets.data && shown.length === 0 && <p className="sub">no markets match</p>}
    </section>
  );
}
