// Money formatting and parsing are exact: integers in, strings out, and back (node --test).
import assert from "node:assert/strict";
import { test } from "node:test";
import { formatContracts, formatDollars, parseDollars } from "../src/money.js";

test("prices show Kalshi's four decimals, at least cents", () => {
  assert.equal(formatDollars(4523n), "$0.4523");
  assert.equal(formatDollars(4500n), "$0.45");
  assert.equal(formatDollars(10_000n), "$1.00");
  assert.equal(formatDollars(1n), "$0.0001");
  assert.equal(formatDollars(-123_000n), "-$12.30");
  assert.equal(formatDollars(12_345_678_9012n), "$12,345,678.9012");
  assert.equal(formatDollars(undefined), "—");
});

test("beyond what a float holds exactly, the digits stay exact", () => {
  assert.equal(formatDollars(9_007_199_254_740_993n), "$900,719,925,474.0993");
  assert.equal(parseDollars("900719925474.0993"), 9_007_199_254_740_993n);
});

test("contracts in hundredths", () => {
  assert.equal(formatContracts(1234n), "12.34");
  assert.equal(formatContracts(1250n), "12.5");
  assert.equal(formatContracts(1200n), "12");
  assert.equal(formatContracts(1n), "0.01");
  assert.equal(formatContracts(123_456_700n), "1,234,567");
});

test("dollar input parses exactly, or is refused", () => {
  assert.equal(parseDollars("0.45"), 4500n);
  assert.equal(parseDollars("$1,000"), 10_000_000n);
  assert.equal(parseDollars(".5"), 5000n);
  assert.equal(parseDollars("-0.0001"), -1n);
  assert.equal(parseDollars("0.1"), 1000n); // 0.1 + 0.2 style float error impossible
  for (const bad of ["", "-", "abc", "0.12345", "1e3", "1.2.3", "0x10"]) {
    assert.throws(() => parseDollars(bad), /not a dollar amount/, bad);
  }
});
