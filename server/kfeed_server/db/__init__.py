"""kfeed's persistence: models, engines, migrations and repositories (no gRPC here)."""

from kfeed_server.db.engine import (
    DEFAULT_DATABASE_URL,
    create_engine,
    create_writer_engine,
    normalise_database_url,
    session_factory,
)
from kfeed_server.db.migrate import downgrade_to_base, schema_is_current, upgrade_to_head

__all__ = [
    "DEFAULT_DATABASE_URL",
    "create_engine",
    "create_writer_engine",
    "downgrade_to_base",
    "normalise_database_url",
    "schema_is_current",
    "session_factory",
    "upgrade_to_head",
]
