"""docker-compose.yml, .env.example and the Dockerfile agree with the real CLI.

No Docker engine is needed: the compose file is read (PyYAML), its
``${VAR}`` substitutions resolved the way compose does, and every kfeed service's command line
and KFEED_* environment parsed by that command's own pydantic-settings class.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import yaml

from kfeed_cli.main import COMMANDS
from kfeed_ingest.cli import IngestCommand
from kfeed_ingest.kalshi.rest import PRODUCTION_REST_URL
from kfeed_server.app import is_loopback_address
from kfeed_server.cli import ServeCommand
from kfeed_server.security import Role, TokenTable
from kfeed_settings import CommandSettings
from kfeed_sim.cli import SimCommand

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
ENV_EXAMPLE_TEXT = (ROOT / ".env.example").read_text()
KFEED_SERVICES = ("serve", "ingest", "sim")
# Values for variables compose requires (${VAR:?…}); tokens need 16+ characters.
REQUIRED_VALUES = {
    "POSTGRES_PASSWORD": "pg-secret",
    "READ_TOKEN": "read-token-for-compose-test",
    "INGEST_TOKEN": "ingest-token-for-compose-test",
}
Settings = TypeVar("Settings", bound=CommandSettings)
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def substitute(text: str, values: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` substitution."""

    def replace(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        value = values.get(name)
        if value:
            return value
        if operator in (":-", "-"):
            return str(argument)
        if operator in (":?", "?"):
            raise KeyError(f"compose would stop: {name}: {argument}")
        return ""

    return _VARIABLE.sub(replace, text)


def env_example() -> dict[str, str]:
    """The KEY=value lines of .env.example."""
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE_TEXT.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs if not key.startswith("#")}


def compose(values: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose document after substitution with ``values`` (defaults: REQUIRED_VALUES)."""
    document = yaml.safe_load(
        substitute(COMPOSE_TEXT, REQUIRED_VALUES if values is None else values)
    )
    assert isinstance(document, dict)
    return cast(dict[str, Any], document)


def service(name: str) -> dict[str, Any]:
    return cast(dict[str, Any], compose()["services"][name])


def command_class(subcommand: str) -> type[CommandSettings]:
    module_name, class_name, _ = COMMANDS[subcommand]
    return cast(type[CommandSettings], getattr(importlib.import_module(module_name), class_name))


def settings_of(name: str, monkeypatch: pytest.MonkeyPatch, expected: type[Settings]) -> Settings:
    """The service's command, parsed by its settings class from its command line and env."""
    subcommand, *flags = service(name)["command"]
    for key in list(os.environ):
        if key.startswith("KFEED_"):
            monkeypatch.delenv(key)
    for key, value in (service(name).get("environment") or {}).items():
        monkeypatch.setenv(key, value)
    # _env_file=None: a developer's ./.env must not leak into the check.
    settings = command_class(subcommand)(_cli_parse_args=flags, _env_file=None)
    assert isinstance(settings, expected)
    return settings


def _flag_names(cls: type[CommandSettings]) -> set[str]:
    names = {f"--{field.replace('_', '-')}" for field in cls.model_fields}
    negations = {
        f"--no-{field.replace('_', '-')}"
        for field, info in cls.model_fields.items()
        if info.annotation is bool
    }
    return names | negations


@pytest.mark.parametrize("name", KFEED_SERVICES)
def test_every_flag_and_variable_of_a_kfeed_service_is_a_real_setting(name: str) -> None:
    subcommand, *arguments = service(name)["command"]
    assert subcommand in COMMANDS
    cls = command_class(subcommand)
    flags = {argument.split("=", 1)[0] for argument in arguments if argument.startswith("--")}
    assert flags <= _flag_names(cls), f"unknown flags for kfeed {subcommand}"
    variables = set(service(name).get("environment") or {})
    known = {f"KFEED_{field.upper()}" for field in cls.model_fields}
    assert variables <= known, f"not settings of kfeed {subcommand}: {variables - known}"


@pytest.mark.parametrize("name", KFEED_SERVICES)
def test_every_kfeed_service_parses_with_its_settings(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_of(name, monkeypatch, CommandSettings)


def test_serve_uses_postgres_once_healthy_and_is_authenticated_beyond_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    postgres, serve = service("postgres"), service("serve")
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert serve["depends_on"]["postgres"]["condition"] == "service_healthy"
    settings = settings_of("serve", monkeypatch, ServeCommand)
    assert settings.database_url.startswith("postgresql+asyncpg://kfeed:pg-secret@postgres:5432/")
    assert settings.migrate
    assert not is_loopback_address(settings.listen)
    assert settings.auth_tokens_file is not None, "kfeed refuses 0.0.0.0 without tokens"
    mounted = {config["target"]: config["source"] for config in serve["configs"]}
    assert str(settings.auth_tokens_file) in mounted


def test_the_generated_tokens_file_gives_each_token_its_role(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(compose()["configs"]["kfeed_tokens"]["content"])
    table = TokenTable.from_file(tokens_file)
    reader = table.authenticate(REQUIRED_VALUES["READ_TOKEN"])
    ingester = table.authenticate(REQUIRED_VALUES["INGEST_TOKEN"])
    assert reader is not None
    assert reader.roles == {Role.READ}
    assert ingester is not None
    assert ingester.roles == {Role.INGEST}


def test_ingest_reads_real_kalshi_by_default_and_reaches_serve_with_its_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ingest = settings_of("ingest", monkeypatch, IngestCommand)
    serve = settings_of("serve", monkeypatch, ServeCommand)
    assert ingest.kalshi_url == PRODUCTION_REST_URL
    assert ingest.server == f"serve:{serve.listen.rsplit(':', 1)[1]}"
    assert ingest.server_token == REQUIRED_VALUES["INGEST_TOKEN"]
    assert service("ingest")["depends_on"]["serve"]["condition"] == "service_healthy"


def test_the_sim_profile_runs_the_simulator_where_the_documented_url_points(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert service("sim")["profiles"] == ["sim"]
    assert all("profiles" not in service(name) for name in ("postgres", "serve", "ingest"))
    sim_port = settings_of("sim", monkeypatch, SimCommand).listen.rsplit(":", 1)[1]
    documented = set(re.findall(r"http://sim:(\d+)/trade-api/v2", COMPOSE_TEXT + ENV_EXAMPLE_TEXT))
    assert documented == {sim_port}
    sim_url = {**REQUIRED_VALUES, "KALSHI_URL": f"http://sim:{sim_port}/trade-api/v2"}
    environment = compose(sim_url)["services"]["ingest"]["environment"]
    assert environment["KFEED_KALSHI_URL"] == f"http://sim:{sim_port}/trade-api/v2"


def test_env_example_documents_every_variable_compose_substitutes() -> None:
    used = {match.group(1) for match in _VARIABLE.finditer(COMPOSE_TEXT)}
    assert used <= set(env_example()), f"missing from .env.example: {used - set(env_example())}"
    assert set(REQUIRED_VALUES) <= used


def test_compose_stops_without_the_required_secrets() -> None:
    with pytest.raises(KeyError, match="INGEST_TOKEN"):
        compose({**REQUIRED_VALUES, "INGEST_TOKEN": ""})


def test_the_image_is_python_311_slim_with_a_frozen_uv_sync() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    assert "uv sync --frozen --no-dev" in dockerfile
    assert 'ENTRYPOINT ["kfeed"]' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "data", ".env"} <= set(ignored)
    assert {"node_modules", "**/node_modules"} & set(ignored)
