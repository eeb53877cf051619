// A kfeed client for Node: Connect clients of the generated service descriptors over gRPC
// (HTTP/2), with an optional bearer token. The messages and descriptors in ./gen are generated
// by `make gen` (buf generate with protoc-gen-es v2); this file is the only hand-written part.
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { createClient, type CallOptions, type Client, type Interceptor } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";
import { BacktestService } from "./gen/kfeed/v1/backtest_service_pb.js";
import { IngestService } from "./gen/kfeed/v1/ingest_service_pb.js";
import {
  MarketService,
  StreamSnapshotsRequestSchema,
  StreamSnapshotsResponseSchema,
  type StreamSnapshotsResponse,
} from "./gen/kfeed/v1/market_service_pb.js";

export * from "./gen/kfeed/v1/backtest_service_pb.js";
export * from "./gen/kfeed/v1/ingest_service_pb.js";
export * from "./gen/kfeed/v1/market_service_pb.js";
export * from "./gen/kfeed/v1/types_pb.js";

export interface KfeedOptions {
  /** Sent as `authorization: Bearer <token>` on every call. */
  token?: string;
  /** Use TLS (https) instead of plaintext HTTP/2. */
  tls?: boolean;
}

export interface KfeedClients {
  markets: Client<typeof MarketService>;
  backtests: Client<typeof BacktestService>;
  ingest: Client<typeof IngestService>;
  /** Closes the HTTP/2 connection (it is kept open between calls, so a process would not exit). */
  close(): void;
}

function bearerToken(token: string): Interceptor {
  return (next) => async (request) => {
    request.header.set("authorization", `Bearer ${token}`);
    return next(request);
  };
}

/** Clients of every kfeed service at `address` (HOST:PORT, default 127.0.0.1:50051). */
export function connectKfeed(address = "127.0.0.1:50051", options: KfeedOptions = {}): KfeedClients {
  const baseUrl = `${options.tls ? "https" : "http"}://${address}`;
  const sessionManager = new Http2SessionManager(baseUrl);
  const transport = createGrpcTransport({
    baseUrl,
    sessionManager,
    interceptors: options.token ? [bearerToken(options.token)] : [],
  });
  return {
    markets: createClient(MarketService, transport),
    backtests: createClient(BacktestService, transport),
    ingest: createClient(IngestService, transport),
    close: () => sessionManager.abort(),
  };
}

/** The exact decimal text of a Dollars value (integer ten-thousandths), e.g. "0.4321". */
export function dollarsText(tenThousandths: bigint): string {
  const sign = tenThousandths < 0n ? "-" : "";
  const units = tenThousandths < 0n ? -tenThousandths : tenThousandths;
  return `${sign}${units / 10_000n}.${(units % 10_000n).toString().padStart(4, "0")}`;
}

/** Snapshots per message `streamSnapshots` asks for: the server batches what is ready together. */
export const DEFAULT_MAX_BATCH_SIZE = 500;

/**
 * StreamSnapshots with batched frames, handed out one message per snapshot: a `snapshot_batch`
 * is split into `snapshot` messages, each carrying the resume token of its own update (resuming
 * from it continues right after that snapshot). Other messages pass through unchanged. Asks for
 * batches of `DEFAULT_MAX_BATCH_SIZE` unless the request sets `maxBatchSize`.
 */
export async function* streamSnapshots(
  markets: Client<typeof MarketService>,
  request: MessageInitShape<typeof StreamSnapshotsRequestSchema>,
  options?: CallOptions,
): AsyncGenerator<StreamSnapshotsResponse> {
  const batched = create(StreamSnapshotsRequestSchema, request);
  if (!batched.maxBatchSize) batched.maxBatchSize = DEFAULT_MAX_BATCH_SIZE;
  for await (const message of markets.streamSnapshots(batched, options)) {
    if (message.event.case !== "snapshotBatch") {
      yield message;
      continue;
    }
    for (const update of message.event.value.updates) {
      yield create(StreamSnapshotsResponseSchema, {
        resumeToken: update.resumeToken,
        event: { case: "snapshot", value: { ...update, resumeToken: "" } },
      });
    }
  }
}
