"""Seeded fault injection for REST responses and WebSocket frames."""

from __future__ import annotations

import random
from enum import Enum

from kfeed_sim.config import FaultConfig


class RestFault(Enum):
    """What to do to one REST response."""

    RATE_LIMITED = "429"
    SERVER_ERROR = "5xx"
    MALFORMED = "malformed"


class FaultInjector:
    """Draws fault decisions from its own generator, so faults never perturb market data."""

    def __init__(self, faults: FaultConfig, sim_seed: int) -> None:
        self._sim_seed = sim_seed
        self.config = faults
        self._rng = random.Random(self._seed_of(faults))

    def _seed_of(self, faults: FaultConfig) -> int:
        # a fixed offset keeps the fault stream apart from the market stream of the same seed
        return (faults.seed if faults.seed is not None else self._sim_seed) + 0x5EED

    def update(self, faults: FaultConfig) -> None:
        """Switch to new knobs and restart the fault stream from their seed."""
        self.config = faults
        self._rng = random.Random(self._seed_of(faults))

    def _hit(self, rate: float) -> bool:
        return rate > 0.0 and self._rng.random() < rate

    def rest_fault(self) -> RestFault | None:
        """The fault for the next REST response, if any (429 checked before 5xx)."""
        if self._hit(self.config.rate_limit_rate):
            return RestFault.RATE_LIMITED
        if self._hit(self.config.error_rate):
            return RestFault.SERVER_ERROR
        if self._hit(self.config.malformed_rate):
            return RestFault.MALFORMED
        return None

    def server_error_status(self) -> int:
        """Which 5xx to answer with."""
        return self._rng.choice((500, 502, 503))

    def drop_socket(self, frames_sent: int) -> bool:
        """Close the socket instead of sending the next data frame?"""
        if self.config.refuse_sockets:
            return True
        every = self.config.drop_socket_every
        if every is not None and frames_sent >= every:
            return True
        return self._hit(self.config.drop_socket_rate)

    def lose_frame(self) -> bool:
        """Drop the next data frame but consume its ``seq`` (a sequence gap)?"""
        return self._hit(self.config.sequence_gap_rate)
