"""``kfeed sim``: run the offline Kalshi-compatible exchange until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from kfeed_settings import CommandSettings
from kfeed_settings.stopping import StopSignals
from kfeed_sim.config import FaultConfig, FaultFlags, SimConfig, SimFlags
from kfeed_sim.server import running_simulator


# The simulator's flags and their limits are defined once, by SimFlags and FaultFlags.
class SimCommand(CommandSettings, FaultFlags, SimFlags):
    """Serve Kalshi's REST and WebSocket APIs over seeded, simulated markets."""

    listen: str = Field(default="127.0.0.1:8765", description="HOST:PORT to listen on")
    api_key_id: str | None = Field(default=None, description="accept only this signing key id")
    api_public_key_file: Path | None = Field(
        default=None, description="PEM public key of --api-key-id (else any key id is accepted)"
    )

    def sim_config(self) -> SimConfig:
        """The simulator configuration these flags describe."""
        api_keys: dict[str, str] = {}
        if self.api_key_id and self.api_public_key_file:
            api_keys[self.api_key_id] = self.api_public_key_file.read_text()
        return SimConfig(
            **_values(self, SimFlags),
            api_keys=api_keys,
            faults=FaultConfig(**_values(self, FaultFlags)),
        )

    def cli_cmd(self) -> None:
        """Run until SIGINT/SIGTERM, printing the REST and WebSocket URLs once listening."""
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        host, _, port = self.listen.rpartition(":")
        stop = StopSignals()
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
        stop.raise_if_interrupted()


def _values(command: SimCommand, flags: type[BaseModel]) -> dict[str, Any]:
    """The values of ``flags``' fields in ``command``."""
    return {name: getattr(command, name) for name in flags.model_fields}
