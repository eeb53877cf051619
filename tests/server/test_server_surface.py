"""What a debugging user sees first: reflection lists the services, health says SERVING."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kfeed_server.app import KfeedServer

KFEED_SERVICES = {"kfeed.v1.MarketService", "kfeed.v1.BacktestService", "kfeed.v1.IngestService"}


async def test_reflection_lists_every_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {
        service.name
        async for response in responses
        for service in response.list_services_response.service
    }
    assert names >= KFEED_SERVICES | {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_reflection_describes_the_contract_rpcs(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter(
            [
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="kfeed.v1.MarketService"
                )
            ]
        )
    )
    files = [r.file_descriptor_response.file_descriptor_proto async for r in responses]
    assert files
    assert any(b"StreamSnapshots" in f for f in files[0])


async def test_health_is_serving_for_the_server_and_each_service(
    channel: grpc.aio.Channel,
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", *sorted(KFEED_SERVICES)):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_health_goes_not_serving_on_shutdown(kfeed_server: KfeedServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{kfeed_server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        await kfeed_server.health.enter_graceful_shutdown()
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
