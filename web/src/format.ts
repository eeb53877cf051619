// Money and time as people read them. Prices are integers in 1/10,000 USD and counts in 1/100
// contract on the wire (int64 → bigint); they are formatted exactly, never through a float sum.
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { Contracts, Dollars } from "@gen/kfeed/v1/types_pb.js";

/** "$0.4523", "$0.45", "-$12.30": Kalshi quotes up to four decimals; at least cents shown. */
export function formatDollars(amount: Dollars | undefined | bigint): string {
  if (amount === undefined) return "—";
  const value = typeof amount === "bigint" ? amount : amount.tenThousandths;
  const negative = value < 0n;
  const abs = negative ? -value : value;
  const whole = abs / 10_000n;
  let fraction = (abs % 10_000n).toString().padStart(4, "0");
  while (fraction.length > 2 && fraction.endsWith("0")) fraction = fraction.slice(0, -1);
  const grouped = whole.toString().replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return `${negative ? "-" : ""}$${grouped}.${fraction}`;
}

/** Contracts in 1/100: "12", "12.5", "0.01". */
export function formatContracts(count: Contracts | undefined | bigint): string {
  if (count === undefined) return "—";
  const value = typeof count === "bigint" ? count : count.hundredths;
  const negative = value < 0n;
  const abs = negative ? -value : value;
  let fraction = (abs % 100n).toString().padStart(2, "0");
  while (fraction.endsWith("0")) fraction = fraction.slice(0, -1);
  const whole = (abs / 100n).toString().replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return `${negative ? "-" : ""}${whole}${fraction ? "." + fraction : ""}`;
}

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
