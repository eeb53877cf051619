"""`kfeed serve` as deployed: beyond loopback with tokens, TLS, JSON logs and metrics, all set
through KFEED_* environment variables, as docker-compose does."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from pathlib import Path

import grpc

from kfeed.v1 import market_service_pb2, market_service_pb2_grpc
from tests.support.processes import free_port
from tests.support.security import READ_TOKEN, CertificateAuthority, bearer, write_tokens_file
from tests.support.waiting import wait_until_serving


async def test_serve_beyond_loopback_with_auth_tls_and_metrics_from_the_environment(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority(tmp_path, "deploy")
    certificate = ca.issue("kfeed-serve", server=True)
    port, metrics_port = free_port(), free_port()
    environment = {
        **os.environ,
        "KFEED_LISTEN": f"0.0.0.0:{port}",
        "KFEED_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'kfeed.db'}",
        "KFEED_AUTH_TOKENS_FILE": str(write_tokens_file(tmp_path)),
        "KFEED_TLS_CERT_FILE": str(certificate.cert_file),
        "KFEED_TLS_KEY_FILE": str(certificate.key_file),
        "KFEED_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "KFEED_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kfeed_cli.main", "serve",
        env=environment, cwd=tmp_path, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        credentials = grpc.ssl_channel_credentials(ca.cert_file.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
            await wait_until_serving(channel)
            stub = market_service_pb2_grpc.MarketServiceStub(channel)
            await stub.ListMarkets(
                market_service_pb2.ListMarketsRequest(),
                metadata=(*bearer(READ_TOKEN), ("x-request-id", "deploy-check")),
            )
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with await asyncio.to_thread(urllib.request.urlopen, url, timeout=5) as response:
            exposition = response.read().decode()
        process.send_signal(signal.SIGTERM)
        return_code = await asyncio.wait_for(process.wait(), timeout=20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stderr = (await process.stderr.read()).decode() if process.stderr else ""
    assert return_code == 0, stderr
    assert (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="ListMarkets",'
        'grpc_service="kfeed.v1.MarketService",grpc_type="unary"} 1.0'
    ) in exposition
    access = [
        entry
        for entry in map(json.loads, stderr.splitlines())
        if entry.get("request_id") == "deploy-check"
    ]
    assert access, "the call left an access line with the caller's request id"
    assert access[-1]["method"] == "/kfeed.v1.MarketService/ListMarkets"
    assert access[-1]["grpc_code"] == "OK"
    assert READ_TOKEN not in stderr
