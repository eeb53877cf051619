"""``kfeed sim``: run the offline Kalshi-compatible exchange until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from pydantic import Field, ValidationError, model_validator

from kfeed_settings import CommandSettings
from kfeed_sim.config import FaultConfig, SimConfig
from kfeed_sim.server import running_simulator


class SimCommand(CommandSettings):
    """Serve Kalshi's REST and WebSocket APIs over seeded, simulated markets."""

    listen: str = Field(default="127.0.0.1:8765", description="HOST:PORT to listen on")
    seed: int = Field(default=1, description="same seed, same markets, prices and trades")
    markets: int = Field(default=12, description="markets kept open or upcoming at once")
    tick_interval: float = Field(default=0.25, description="seconds per simulation step")
    history_steps: int = Field(default=240, description="past steps generated at start")
    firehose: bool = Field(
        default=False,
        description="load tests: long-lived markets, every open market changes every step",
    )
    auto_step: bool = Field(
        default=True, description="advance on a timer; --no-auto-step: only POST /_sim/step"
    )
    api_key_id: str | None = Field(default=None, description="accept only this signing key id")
    api_public_key_file: Path | None = Field(
        default=None, description="PEM public key of --api-key-id (else any key id is accepted)"
    )
    legacy_integer_fields: bool = Field(default=True, description="also send the integer fields")
    ping_interval: float = Field(default=10.0, description="seconds between WebSocket pings")
    ws_queue_size: int = Field(
        default=10_000, description="frames buffered per socket before a slow reader is dropped"
    )
    error_rate: float = Field(default=0.0, description="share of REST answers that are 5xx")
    rate_limit_rate: float = Field(default=0.0, description="share of REST answers that are 429")
    retry_after_seconds: int | None = Field(default=None, description="Retry-After on 429s")
    latency_ms: float = Field(default=0.0, description="added to every REST answer")
    malformed_rate: float = Field(default=0.0, description="share of truncated REST bodies")
    drop_socket_every: int | None = Field(default=None, description="drop sockets every N frames")
    drop_socket_rate: float = Field(default=0.0, description="chance to drop before a frame")
    sequence_gap_rate: float = Field(default=0.0, description="share of frames lost (seq gaps)")

    @model_validator(mode="after")
    def _within_simulator_limits(self) -> SimCommand:
        """The simulator's own limits, checked with the flags, so a value out of range is a usage
        error naming its flag (the key file is read later)."""
        try:
            self._config(api_keys={})
        except ValidationError as error:
            raise ValueError(
                "; ".join(
                    f"--{str(problem['loc'][-1]).replace('_', '-')}: {problem['msg']}"
                    for problem in error.errors(include_url=False)
                )
            ) from None
        return self

    def sim_config(self) -> SimConfig:
        """The simulator configuration these flags describe."""
        api_keys: dict[str, str] = {}
        if self.api_key_id and self.api_public_key_file:
            api_keys[self.api_key_id] = self.api_public_key_file.read_text()
        return self._config(api_keys)

    def _config(self, api_keys: dict[str, str]) -> SimConfig:
        faults = FaultConfig(
            error_rate=self.error_rate,
            rate_limit_rate=self.rate_limit_rate,
            retry_after_seconds=self.retry_after_seconds,
            latency_ms=self.latency_ms,
            malformed_rate=self.malformed_rate,
            drop_socket_every=self.drop_socket_every,
            drop_socket_rate=self.drop_socket_rate,
            sequence_gap_rate=self.sequence_gap_rate,
        )
        return SimConfig(
            seed=self.seed,
            markets=self.markets,
            tick_interval=self.tick_interval,
            auto_step=self.auto_step,
            history_steps=self.history_steps,
            firehose=self.firehose,
            api_keys=api_keys,
            faults=faults,
            legacy_integer_fields=self.legacy_integer_fields,
            ping_interval=self.ping_interval,
            ws_queue_size=self.ws_queue_size,
        )

    def cli_cmd(self) -> None:
        """Run until SIGINT/SIGTERM, printing the REST and WebSocket URLs once listening."""
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        host, _, port = self.listen.rpartition(":")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with running_simulator(self.sim_config(), host or "127.0.0.1", int(port)) as sim:
            print(f"kfeed sim: seed {self.seed}, {self.markets} markets", flush=True)
            print(f"REST      {sim.rest_url}", flush=True)
            print(f"WebSocket {sim.ws_url}", flush=True)
            stopped, closed = (
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(sim.wait_closed()),
            )
            await asyncio.wait((stopped, closed), return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            closed.cancel()
