"""Which role each RPC needs.

Decided per service, with per-method overrides; anything not listed needs ``admin``, so a
service added later is closed until someone decides who may call it. Health checking and
reflection stay open: load balancers and grpcurl must reach them without a token.
"""

from __future__ import annotations

from kfeed_server.security.tokens import Role

OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

# Backtests only read stored market data and write their own results, and a backtest's cost is
# bounded by the process pool and the per-token rate limit, so creating, watching and cancelling
# them is a reader's business (see docs/adr/0007-auth-and-observability.md).
SERVICE_ROLES: dict[str, Role] = {
    "kfeed.v1.MarketService": Role.READ,
    "kfeed.v1.BacktestService": Role.READ,
    "kfeed.v1.IngestService": Role.INGEST,
}

# Full method name -> role, for methods that differ from their service's role.
METHOD_ROLES: dict[str, Role] = {}

# Full method name -> a role that may call it besides the one it needs. A starting ingest
# process reads the feed gaps an earlier one left unrecovered, to repair them
# (docs/INGEST_RULES.md, "Feed gaps"); gap metadata is nothing an ingest token must not see.
ALSO_ALLOWED: dict[str, Role] = {"/kfeed.v1.MarketService/ListFeedGaps": Role.INGEST}


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def required_role(full_method: str) -> Role | None:
    """The role ``full_method`` needs, or None when it is open to anyone."""
    if full_method in METHOD_ROLES:
        return METHOD_ROLES[full_method]
    service, _ = split_method(full_method)
    if service in OPEN_SERVICES:
        return None
    return SERVICE_ROLES.get(service, Role.ADMIN)


def allowed_roles(full_method: str) -> frozenset[Role] | None:
    """The roles any one of which may call ``full_method``, or None when it is open to anyone."""
    role = required_role(full_method)
    if role is None:
        return None
    also = ALSO_ALLOWED.get(full_method)
    return frozenset({role} if also is None else {role, also})
