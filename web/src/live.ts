// The latest snapshot of every market, updated from StreamSnapshots. Rows subscribe to their own
// ticker, and notifications are flushed once per animation frame, so a hundred markets updating
// every second re-render only the rows that changed, at most once a frame.
import { useSyncExternalStore } from "react";
import type { MarketSnapshot } from "@gen/kfeed/v1/types_pb.js";

const SPARK_POINTS = 60;

export interface LiveRow {
  snapshot: MarketSnapshot;
  /** Recent mid (or last) prices in dollars, oldest first, for the sparkline. */
  spark: number[];
  /** performance.now() of the last update, to flash the row. */
  updatedAt: number;
}

function sparkValue(snapshot: MarketSnapshot): number | undefined {
  const bid = snapshot.yesBid?.tenThousandths;
  const ask = snapshot.yesAsk?.tenThousandths;
  if (bid !== undefined && ask !== undefined && ask > 0n) return Number(bid + ask) / 20_000;
  const last = snapshot.lastPrice?.tenThousandths;
  return last === undefined ? undefined : Number(last) / 10_000;
}

export class LiveBoard {
  private rows = new Map<string, LiveRow>();
  private listeners = new Map<string, Set<() => void>>();
  private dirty = new Set<string>();
  private frame = 0;
  /** Snapshots applied since the board was made (the performance test reads it). */
  applied = 0;

  apply(snapshot: MarketSnapshot): void {
    const previous = this.rows.get(snapshot.ticker);
    if (previous && previous.snapshot.snapshotId > snapshot.snapshotId) return;
    const spark = previous ? previous.spark.slice(-(SPARK_POINTS - 1)) : [];
    const value = sparkValue(snapshot);
    if (value !== undefined) spark.push(value);
    this.rows.set(snapshot.ticker, { snapshot, spark, updatedAt: performance.now() });
    this.applied += 1;
    this.dirty.add(snapshot.ticker);
    if (!this.frame) this.frame = requestAnimationFrame(this.flush);
  }

  get(ticker: string): LiveRow | undefined {
    return this.rows.get(ticker);
  }

  private flush = (): void => {
    this.frame = 0;
    const tickers = [...this.dirty];
    this.dirty.clear();
    for (const ticker of tickers) {
      for (const listener of this.listeners.get(ticker) ?? []) listener();
    }
  };

  subscribe(ticker: string, listener: () => void): () => void {
    let set = this.listeners.get(ticker);
    if (!set) this.listeners.set(ticker, (set = new Set()));
    set.add(listener);
    return () => set.delete(listener);
  }

  dispose(): void {
    if (this.frame) cancelAnimationFrame(this.frame);
  }
}

export function useLiveRow(board: LiveBoard, ticker: string): LiveRow | undefined {
  return useSyncExternalStore(
    (listener) => board.subscribe(ticker, listener),
    () => board.get(ticker),
  );
}
