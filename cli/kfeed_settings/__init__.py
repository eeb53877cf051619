"""The base of every `kfeed` sub-command's settings, and the error a command reports as one line.

Each sub-command is a pydantic-settings model: its fields are the command's flags
(``database_url`` is ``--database-url``) and each is also read from ``KFEED_<FIELD>``
(``KFEED_DATABASE_URL``). Flags win over the environment, which wins over ``.env``, which wins
over the defaults. ``--help`` shows each flag's description, default and variable.

This package imports no other kfeed package: the server, the ingest, the simulator and the
``kfeed`` entry point all build on it.
"""

from __future__ import annotations

from typing import Any

from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "KFEED_"


class CommandError(Exception):
    """A failure the user can act on (a port in use, an unreachable database): ``kfeed`` prints
    its message as one line and exits 1, with the traceback only under ``--debug``."""


class CommandSettings(BaseSettings):
    """Subclass, add fields (each with a ``description``) and implement ``cli_cmd``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        extra="ignore",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_enforce_required=False,
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        for name, field in cls.model_fields.items():
            if field.default_factory is not None:
                # For --help to show the value rather than "(default factory: <lambda>)"; the
                # factory still makes each instance's default.
                field.default = field.get_default(call_default_factory=True, validated_data={})
            variable = f"{ENV_PREFIX}{name.upper()}"
            if variable not in (field.description or ""):
                described = f"{field.description} " if field.description else ""
                field.description = f"{described}[env {variable}]"

    def cli_cmd(self) -> None:
        raise NotImplementedError
