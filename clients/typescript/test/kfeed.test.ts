// Calls a running kfeed server (KFEED_ADDRESS) holding snapshots of KFEED_TICKER: a unary call
// and a server stream. tests/clients/test_typescript.py starts the server and runs this.
import assert from "node:assert/strict";
import { test } from "node:test";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { connectKfeed, dollarsText, streamSnapshots } from "../src/index.js";

const address = process.env.KFEED_ADDRESS ?? "127.0.0.1:50051";
const ticker = process.env.KFEED_TICKER ?? "";
const expectedBids = (process.env.KFEED_EXPECTED_BIDS ?? "").split(",").filter(Boolean);

test("GetMarket (unary)", async () => {
  const kfeed = connectKfeed(address, { token: "ts-test" });
  const response = await kfeed.markets
    .getMarket({ ticker }, { timeoutMs: 10_000 })
    .finally(kfeed.close);
  assert.equal(response.market?.ticker, ticker);
  assert.ok(response.market?.closeTime, "close time is set");
});

test("StreamSnapshots replays history then marks caught-up (server streaming)", async () => {
  const kfeed = connectKfeed(address);
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 10_000);
  const bids: string[] = [];
  let caughtUp = false;
  try {
    const stream = kfeed.markets.streamSnapshots(
      { tickers: [ticker], startTime: timestampFromDate(new Date("2000-01-01T00:00:00Z")) },
      { signal: abort.signal },
    );
    for await (const message of stream) {
      assert.ok(message.resumeToken, "every message carries a resume token");
      if (message.event.case === "caughtUp") {
        caughtUp = true;
        break; // leaving the loop cancels the call
      }
      if (message.event.case === "snapshot") {
        bids.push(dollarsText(message.event.value.snapshot?.yesBid?.tenThousandths ?? 0n));
      }
    }
  } finally {
    clearTimeout(timer);
    kfeed.close();
  }
  assert.ok(caughtUp, "the caught-up marker arrived");
  assert.deepEqual(bids, expectedBids);
});

test("streamSnapshots hides batches: one message per snapshot, each resumable", async () => {
  const kfeed = connectKfeed(address);
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 10_000);
  const history = { tickers: [ticker], startTime: timestampFromDate(new Date("2000-01-01Z")) };
  const bids: string[] = [];
  const tokens: string[] = [];
  try {
    for await (const message of streamSnapshots(
      kfeed.markets,
      { ...history, maxBatchSize: 3 },
      { signal: abort.signal },
    )) {
      assert.ok(message.resumeToken, "every message carries a resume token");
      if (message.event.case === "caughtUp") break;
      assert.equal(message.event.case, "snapshot");
      if (message.event.case === "snapshot") {
        bids.push(dollarsText(message.event.value.snapshot?.yesBid?.tenThousandths ?? 0n));
        tokens.push(message.resumeToken);
      }
    }
    assert.deepEqual(bids, expectedBids);
    // Resuming from the second snapshot's token (inside the first batch) continues after it.
    const rest: string[] = [];
    for await (const message of streamSnapshots(
      kfeed.markets,
      { tickers: [ticker], resumeToken: tokens[1] },
      { signal: abort.signal },
    )) {
      if (message.event.case === "caughtUp") break;
      if (message.event.case === "snapshot") {
        rest.push(dollarsText(message.event.value.snapshot?.yesBid?.tenThousandths ?? 0n));
      }
    }
    assert.deepEqual(rest, expectedBids.slice(2));
  } finally {
    clearTimeout(timer);
    kfeed.close();
  }
});

test("dollarsText is exact", () => {
  assert.equal(dollarsText(4321n), "0.4321");
  assert.equal(dollarsText(-12_500n), "-1.2500");
});
