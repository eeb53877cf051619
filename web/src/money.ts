// Money exactly: prices are integers in 1/10,000 USD and counts in 1/100 contract on the wire
// (int64 → bigint). Formatting and parsing go through integers and strings, never a float.
import type { Contracts, Dollars } from "@gen/kfeed/v1/types_pb.js";

function grouped(whole: bigint): string {
  return whole.toString().replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

/** "$0.4523", "$0.45", "-$12.30": Kalshi quotes up to four decimals; at least cents shown. */
export function formatDollars(amount: Dollars | undefined | bigint): string {
  if (amount === undefined) return "—";
  const value = typeof amount === "bigint" ? amount : amount.tenThousandths;
  const negative = value < 0n;
  const abs = negative ? -value : value;
  const whole = abs / 10_000n;
  let fraction = (abs % 10_000n).toString().padStart(4, "0");
  while (fraction.length > 2 && fraction.endsWith("0")) fraction = fraction.slice(0, -1);
  return `${negative ? "-" : ""}$${grouped(whole)}.${fraction}`;
}

/** Contracts in 1/100: "12", "12.5", "0.01". */
export function formatContracts(count: Contracts | undefined | bigint): string {
  if (count === undefined) return "—";
  const value = typeof count === "bigint" ? count : count.hundredths;
  const negative = value < 0n;
  const abs = negative ? -value : value;
  let fraction = (abs % 100n).toString().padStart(2, "0");
  while (fraction.endsWith("0")) fraction = fraction.slice(0, -1);
  return `${negative ? "-" : ""}${grouped(abs / 100n)}${fraction ? "." + fraction : ""}`;
}

/** Exact decimal dollars ("0.45", "$1,000") → 1/10,000 USD, no float. */
export function parseDollars(text: string): bigint {
  const cleaned = text.replace(/[$,\s]/g, "");
  const match = /^(-?)(\d*)(?:\.(\d{0,4}))?$/.exec(cleaned);
  if (!match || (match[2] === "" && !match[3])) throw new Error(`not a dollar amount: ${text}`);
  const value = BigInt(match[2] || "0") * 10_000n + BigInt((match[3] ?? "").padEnd(4, "0") || "0");
  return match[1] ? -value : value;
}

