"""The base of every `kfeed` sub-command's settings.

Each sub-command is a pydantic-settings model: its fields are the command's flags
(``database_url`` is ``--database-url``) and each is also read from ``KFEED_<FIELD>``
(``KFEED_DATABASE_URL``). Flags win over the environment, which wins over ``.env``, which wins
over the defaults.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class CommandSettings(BaseSettings):
    """Subclass, add fields, and implement ``cli_cmd`` to run the command."""

    model_config = SettingsConfigDict(
        env_prefix="KFEED_",
        env_file=".env",
        extra="ignore",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_enforce_required=False,
    )

    def cli_cmd(self) -> None:
        raise NotImplementedError
