"""A thin typed client for kfeed over the generated kfeed.v1 grpcio stubs.

    async with kfeed_client.connect("127.0.0.1:50051") as client:
        market = await client.get_market("KXBTC-25DEC31-B100000")
        async for message in client.stream_snapshots([market.ticker]):
            ...

Needs only grpcio, protobuf and googleapis-common-protos (plus rich for the CLI).
"""

from kfeed_client.client import KfeedClient, connect, to_duration, to_timestamp
from kfeed_client.connection import DEFAULT_ADDRESS, TlsConfig, open_channel
from kfeed_client.money import (
    contracts_to_decimal,
    decimal_to_contracts,
    decimal_to_dollars,
    dollars_to_decimal,
)
from kfeed_client.streaming import RETRYABLE_CODES, RetryPolicy, resumable_stream

__all__ = [
    "DEFAULT_ADDRESS",
    "RETRYABLE_CODES",
    "KfeedClient",
    "RetryPolicy",
    "TlsConfig",
    "connect",
    "contracts_to_decimal",
    "decimal_to_contracts",
    "decimal_to_dollars",
    "dollars_to_decimal",
    "open_channel",
    "resumable_stream",
    "to_duration",
    "to_timestamp",
]
