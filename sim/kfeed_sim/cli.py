"""``kfeed sim``: run the offline Kalshi-compatible exchange until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from kfeed_settings import CommandSettings
from kfeed_settings.stopping import StopSignals
from kfeed_sim.config import FaultConfig, FaultFlags, SimConfig, SimFlags
from kfeed_sim.server import running_simulator
from kfeed_sim.signing import generate_key_pair


# The simulator's flags and their limits are defined once, by SimFlags and FaultFlags.
class SimCommand(CommandSettings, FaultFlags, SimFlags):
    """Serve Kalshi's REST and WebSocket APIs over seeded, simulated markets."""

    listen: str = Field(default="127.0.0.1:8765", description="HOST:PORT to listen on")
    api_key_id: str | None = Field(default=None, description="accept only this signing key id")
    api_public_key_file: Path | None = Field(
        default=None, description="PEM public key of --api-key-id (else any key id is accepted)"
    )
    api_private_key_file: Path | None = Field(
        default=None,
        description="hand out a key pair as Kalshi does: its private key here, its public key in"
        " --api-public-key-file (kept when both files exist)",
    )

    @model_validator(mode="after")
    def _key_pair_flags(self) -> SimCommand:
        if self.api_private_key_file is not None and (
            self.api_key_id is None or self.api_public_key_file is None
        ):
            raise ValueError("--api-private-key-file needs --api-key-id and --api-public-key-file")
        return self

    def sim_config(self) -> SimConfig:
        """The simulator configuration these flags describe, after handing out the key pair
        (before the sim listens: a client that waits for the port finds its key)."""
        api_keys: dict[str, str] = {}
        if self.api_key_id and self.api_public_key_file:
            self._hand_out_key_pair()
            api_keys[self.api_key_id] = self.api_public_key_file.read_text()
        return SimConfig(
            **_values(self, SimFlags),
            api_keys=api_keys,
            faults=FaultConfig(**_values(self, FaultFlags)),
        )

    def cli_cmd(self) -> None:
        """Run until SIGINT/SIGTERM, printing the REST and WebSocket URLs once listening."""
        asyncio.run(self._serve())

    def _hand_out_key_pair(self) -> None:
        private_path, public_path = self.api_private_key_file, self.api_public_key_file
        if private_path is None or public_path is None:
            return
        if private_path.exists() and public_path.exists():
            return
        private_pem, public_pem = generate_key_pair()
        private_path.write_bytes(private_pem)
        private_path.chmod(0o600)
        public_path.write_bytes(public_pem)

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
