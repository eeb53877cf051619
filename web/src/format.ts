// Numbers and times as people read them (money itself: money.ts).
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { Dollars } from "@gen/kfeed/v1/types_pb.js";

export { formatContracts, formatDollars, parseDollars } from "./money";

/** A price as a number of dollars, for charts only (display uses formatDollars). */
export function dollarsNumber(amount: Dollars | undefined): number | undefined {
  return amount === undefined ? undefined : Number(amount.tenThousandths) / 10_000;
}

export function formatPercent(fraction: number | undefined, digits = 1): string {
  if (fraction === undefined || !Number.isFinite(fraction)) return "—";
  return `${(fraction * 100).toFixed(digits)}%`;
}

export function formatNumber(value: number | undefined, digits = 2): string {
  if (value === undefined || !Number.isFinite(value)) return "—";
  return value.toFixed(digits);
}

const localFormat = new Intl.DateTimeFormat(undefined, {
  year: "numeric",
  month: "short",
  day: "2-digit",
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
});

export function toDate(ts: Timestamp | undefined): Date | undefined {
  return ts === undefined ? undefined : timestampDate(ts);
}

/** In the viewer's time zone. */
export function formatLocal(date: Date | undefined): string {
  return date === undefined ? "—" : localFormat.format(date);
}

/** ISO 8601 in UTC, for the hover title. */
export function formatUtc(date: Date | undefined): string {
  return date === undefined ? "" : date.toISOString().replace("T", " ").replace("Z", " UTC");
}
