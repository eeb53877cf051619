import { createClient } from "@connectrpc/connect";
import { useTransport } from "@connectrpc/connect-query";
import { MarketService, type StreamSnapshotsResponse } from "@gen/kfeed/v1/market_service_pb.js";
import type { FeedGap } from "@gen/kfeed/v1/types_pb.js";
import { useQuery as useRpcQuery } from "@connectrpc/connect-query";
import { useQuery } from "@tanstack/react-query";
import { useMemo, useRef, useState } from "react";
import { noteError, token } from "../client";
import { Notice, StreamBadge } from "../components/Notice";
import { Time } from "../components/Time";
import { formatNumber } from "../format";
import { mergeGaps } from "../gaps";
import { useServerStream } from "../streams";

type Samples = Map<string, number>;
const RECENT_GAPS = 50;

/** Prometheus text: `name{labels} value` lines, summed per name{labels} as written. */
function parseMetrics(text: string): Samples {
  const samples: Samples = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const space = line.lastIndexOf(" ");
    samples.set(line.slice(0, space), Number(line.slice(space + 1)));
  }
  return samples;
}

function total(samples: Samples | undefined, name: string, labelFilter = ""): number | undefined {
  if (!samples) return undefined;
  let sum: number | undefined;
  for (const [key, value] of samples) {
    const bare = key.split("{")[0];
    if (bare === name && key.includes(labelFilter)) sum = (sum ?? 0) + value;
  }
  return sum;
}

async function scrape(): Promise<{ samples: Samples; at: number }> {
  const headers: Record<string, string> = {};
  if (token.get()) headers.authorization = `Bearer ${token.get()}`;
  const response = await fetch("/metrics", { headers });
  if (!response.ok) throw new Error(`metrics: HTTP ${response.status}`);
  return { samples: parseMetrics(await response.text()), at: performance.now() };
}

export function StatusPage() {
  const transport = useTransport();
  const client = useMemo(() => createClient(MarketService, transport), [transport]);
  const health = useQuery({
    queryKey: ["status", "health"],
    queryFn: async () => {
      const started = performance.now();
      await client.listMarkets({ pageSize: 1 });
      return performance.now() - started;
    },
    refetchInterval: 5000,
    retry: false,
  });
  const previous = useRef<{ samples: Samples; at: number } | undefined>(undefined);
  const [rates, setRates] = useState<{ snapshots?: number; trades?: number; batches?: number }>({});
  const metrics = useQuery({
    queryKey: ["status", "metrics"],
    queryFn: async () => {
      const current = await scrape();
      const before = previous.current;
      if (before) {
        const seconds = (current.at - before.at) / 1000;
        const rate = (name: string, filter = "") => {
          const now = total(current.samples, name, filter);
          const then = total(before.samples, name, filter);
          return now === undefined || then === undefined ? undefined : (now - then) / seconds;
        };
        setRates({
          snapshots: rate("kfeed_snapshots_stored_total"),
          trades: rate("kfeed_trades_stored_total"),
          batches: rate("kfeed_ingest_batches_total", 'outcome="stored"'),
        });
      }
      previous.current = current;
      return current.samples;
    },
    refetchInterval: 2000,
    retry: false,
  });
  const [liveGaps, setGaps] = useState<FeedGap[]>([]);
  // The newest stored gaps, then live ones as ingest reports them (the snapshots, conflated to
  // 5 s and batched, are not shown).
  const stored = useRpcQuery(MarketService.method.listFeedGaps, { pageSize: RECENT_GAPS }, { retry: false });
  const stream = useServerStream<StreamSnapshotsResponse>(
    "status/gaps",
    (signal, resumeToken) =>
      client.streamSnapshots(
        { resumeToken, conflationInterval: { seconds: 5n }, maxBatchSize: 500, heartbeatInterval: { seconds: 15n } },
        { signal },
      ),
    (message) => {
      if (message.event.case === "feedGap") {
        const gap = message.event.value;
        // A gap is sent again when it is recovered: keep its latest state, once.
        setGaps((current) => [gap, ...current.filter((g) => g.gapId !== gap.gapId)].slice(0, RECENT_GAPS));
      }
    },
  );
  const gaps = mergeGaps(stored.data?.feedGaps ?? [], liveGaps).slice(0, RECENT_GAPS);
  if (health.error) noteError(health.error);
  const samples = metrics.data;
  return (
    <section>
      <h1>Status</h1>
      <div className="cards">
        <div className="card" data-testid="health">
          <h3>Server</h3>
          {health.error ? <Notice error={health.error} what="Health" />
            : health.data !== undefined ? <p className="ok">serving · {formatNumber(health.data, 0)} ms round trip</p>
            : <p>checking…</p>}
        </div>
        <div className="card" data-testid="ingest-rate">
          <h3>Ingest</h3>
          <p>{formatNumber(rates.snapshots, 1)} snapshots/s · {formatNumber(rates.trades, 1)} trades/s · {formatNumber(rates.batches, 2)} batches/s</p>
          <p className="sub">{total(samples, "kfeed_snapshots_stored_total") ?? "—"} snapshots stored since start</p>
        </div>
        <div className="card" data-testid="subscribers">
          <h3>Subscribers</h3>
          <p>{total(samples, "kfeed_stream_subscribers") ?? "—"} live stream subscriptions</p>
          <p className="sub">{total(samples, "kfeed_stream_queued_items") ?? "—"} items queued · {total(samples, "kfeed_backtests_running") ?? "—"} backtests running</p>
        </div>
        <div className="card" data-testid="feed-gaps">
          <h3>Feed gaps</h3>
          <p>{total(samples, "kfeed_feed_gaps_total") ?? "—"} stored since start ({total(samples, "kfeed_feed_gaps_total", 'recovered="true"') ?? 0} recovered)</p>
          <StreamBadge state={stream.state} />
        </div>
      </div>
      {metrics.error ? <p className="notice error">Metrics: {String((metrics.error as Error).message)}</p> : null}
      <h2>Recent feed gaps</h2>
      {stored.error ? <Notice error={stored.error} what="Stored feed gaps" /> : null}
      <table>
        <thead><tr><th>detected</th><th>market</th><th>channel</th><th className="num">expected seq</th><th className="num">received seq</th><th>recovered</th></tr></thead>
        <tbody>
          {gaps.map((gap) => (
            <tr key={gap.gapId.toString()} data-testid="feed-gap-row">
              <td><Time value={gap.detectTime} /></td><td>{gap.ticker || "all"}</td><td>{gap.channel}</td>
              <td className="num">{gap.expectedSequence.toString()}</td><td className="num">{gap.receivedSequence.toString()}</td>
              <td>{gap.recovered ? <Time value={gap.recoverTime} /> : "no"}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {gaps.length === 0 && <p className="sub">none so far</p>}
    </section>
  );
}
