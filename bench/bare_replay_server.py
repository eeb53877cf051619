"""The baseline of bench_replay, run as its own process: a bare grpc.aio server that streams the
stored snapshots of a database, prebuilt in memory as StreamSnapshotsResponse messages of 100
snapshots each, then a caught-up marker — gRPC's and protobuf's own cost, no storage read and no
conversion while streaming. Prints ``ready PORT`` once the messages are built.

    python -m bench.bare_replay_server --database-url URL
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.db import create_engine
from kfeed_server.db.repositories import build_repositories
from kfeed_server.transport.convert import snapshot_to_proto

PER_MESSAGE = 100
READ_PAGE = 50_000


class BareReplay(pb_grpc.MarketServiceServicer):
    def __init__(self, messages: Sequence[pb.StreamSnapshotsResponse]) -> None:
        self.messages = messages

    async def StreamSnapshots(  # noqa: N802 - the generated method name
        self, request: pb.StreamSnapshotsRequest, context: Any
    ) -> AsyncIterator[pb.StreamSnapshotsResponse]:
        for message in self.messages:
            yield message
        yield pb.StreamSnapshotsResponse(caught_up=pb.CaughtUp(replayed_count=-1))


async def load_messages(database_url: str) -> list[pb.StreamSnapshotsResponse]:
    engine = create_engine(database_url)
    snapshots = build_repositories(engine).snapshots
    messages: list[pb.StreamSnapshotsResponse] = []
    after = 0
    while page := await snapshots.list_after_id(after, tickers=None, limit=READ_PAGE):
        for start in range(0, len(page), PER_MESSAGE):
            part = page[start : start + PER_MESSAGE]
            messages.append(
                pb.StreamSnapshotsResponse(
                    resume_token=str(part[-1].snapshot_id),
                    snapshot_batch=pb.SnapshotBatch(
                        updates=[pb.SnapshotUpdate(snapshot=snapshot_to_proto(s)) for s in part]
                    ),
                )
            )
        after = page[-1].snapshot_id
    await engine.dispose()
    return messages


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True)
    args = parser.parse_args()
    messages = await load_messages(args.database_url)
    server = grpc.aio.server()
    pb_grpc.add_MarketServiceServicer_to_server(BareReplay(messages), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"ready {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
