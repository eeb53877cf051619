"""Settings of the simulator: the market model, the protocol options and the fault knobs."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class FaultFlags(BaseModel):
    """The fault knobs `kfeed sim` takes as flags (SimCommand inherits them)."""

    error_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="REST 5xx rate")
    rate_limit_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="REST 429 rate")
    retry_after_seconds: int | None = Field(
        default=None, ge=0, description="send Retry-After on 429s (real Kalshi sends none)"
    )
    latency_ms: float = Field(default=0.0, ge=0.0, description="added to every REST response")
    malformed_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="REST 200s with a truncated JSON body"
    )
    drop_socket_every: int | None = Field(
        default=None, ge=1, description="close each WebSocket after N data frames"
    )
    drop_socket_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="close the WebSocket before a data frame"
    )
    sequence_gap_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="lose a data frame but consume its seq"
    )
    withhold_snapshots: bool = Field(
        default=False,
        description="accept get_snapshot but send no book (a fresh book that never comes)",
    )
    refuse_sockets: bool = Field(
        default=False,
        description="close every WebSocket before its next data frame and answer new handshakes"
        " HTTP 503 (an exchange outage on the socket; REST keeps serving)",
    )


class FaultConfig(FaultFlags):
    """Fault knobs. Rates are probabilities in [0, 1] drawn from a generator seeded by ``seed``.

    Every knob can be changed while the simulator runs (``POST /_sim/faults`` or
    ``SimHandle.set_faults``), so a test can switch faults on and off around one request.
    """

    model_config = ConfigDict(extra="forbid")

    seed: int | None = Field(default=None, description="fault generator seed; None = the sim seed")


class SimFlags(BaseModel):
    """The simulator settings `kfeed sim` takes as flags (SimCommand inherits them)."""

    seed: int = Field(default=1, description="same seed, same markets, prices and trades")
    markets: int = Field(default=12, ge=1, description="markets kept open or upcoming at once")
    tick_interval: float = Field(
        default=0.25, gt=0.0, description="wall seconds per live step (also the sim-time step)"
    )
    auto_step: bool = Field(
        default=True,
        description="advance on a timer; off: only POST /_sim/step (SimHandle.advance) steps",
    )
    firehose: bool = Field(
        default=False,
        description="load tests: markets live 100× longer and every open market changes every"
        " step (one book level and a ticker frame; trades rarer), so the sim sends about"
        " markets / tick_interval states per second",
    )
    firehose_depth_changes: int = Field(
        default=0,
        ge=0,
        le=8,
        description="with --firehose, this many more levels below the best bids take a new size"
        " in every open market at every step: book deltas that no ticker frame reports (order"
        " book load tests)",
    )
    history_steps: int = Field(default=240, ge=0, description="past steps generated at start")
    legacy_integer_fields: bool = Field(
        default=True, description="emit the pre-2026-03-12 integer cent/count fields too"
    )
    ping_interval: float = Field(default=10.0, gt=0.0, description="server WebSocket pings")
    ws_queue_size: int = Field(
        default=10_000, ge=1, description="frames buffered per socket before it is dropped"
    )


class SimConfig(SimFlags):
    """Everything that shapes one simulator run. Same config (and seed) → same data."""

    model_config = ConfigDict(extra="forbid")

    start_time: datetime | None = Field(
        default=None, description="sim time of live step 0 (UTC); None = wall clock at start"
    )
    history_step_seconds: int = Field(default=60, ge=1, description="sim seconds per past step")
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="key id → public key PEM; empty = any key id, headers still required",
    )
    signature_max_age_seconds: float = Field(
        default=300.0, gt=0.0, description="accepted clock skew of KALSHI-ACCESS-TIMESTAMP"
    )
    faults: FaultConfig = Field(default_factory=FaultConfig)
