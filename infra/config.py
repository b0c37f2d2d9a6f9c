"""Settings: every REGISTRY_* variable of the contract, in one typed, frozen object.

Read once at start-up by pydantic-settings, from the environment
(`REGISTRY_<NAME>`; an empty value counts as unset) and then from command-line
flags (a flag wins), and passed down; nothing else in the daemon reads
os.environ. A bad value raises SettingError naming the variable, which the
entry point turns into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "REGISTRY_"

Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]

_SUBJECT_TOKEN = re.compile(r"^[^\s.*>]+$")
_STREAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_NATS_SCHEMES = {"nats", "tls", "ws", "wss"}
_PG_SCHEMES = {"postgres", "postgresql"}


class SettingError(Exception):
    """A setting has a value the daemon cannot start with."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.variable = ENV_PREFIX + field.upper()
        self.flag = "--" + field.replace("_", "-")
        super().__init__(f"{self.variable} ({self.flag}): {message}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (given as init values) over the environment; no .env files or
        # secret directories: systemd's EnvironmentFile= is the one place.
        return (init_settings, env_settings)

    # NATS
    nats_url: str = "nats://127.0.0.1:4222"
    nats_creds: Path | None = None
    nats_nkey: SecretStr | None = None
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_token: SecretStr | None = None
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    # The connection that reads and writes the intent stream and delivers
    # intents to workers may log in as a NATS user of its own (see
    # systemd/nats-server.conf): unset, it uses the settings above.
    nats_intents_creds: Path | None = None
    nats_intents_nkey: SecretStr | None = None
    nats_intents_user: str | None = None
    nats_intents_password: SecretStr | None = None
    # PostgreSQL
    database_url: SecretStr = SecretStr("postgresql:///registry")
    db_pool_size: Annotated[int, Field(ge=1, le=1000)] = 20
    db_timeout: Seconds = 5.0
    # The service
    subject_prefix: str = "registry"
    stream: str = "REGISTRY_BACKEND_OPS"
    stream_replicas: Annotated[int, Field(ge=1, le=5)] = 1
    registration_token: SecretStr | None = None
    auto_approve: bool = False
    max_payload: Annotated[int, Field(ge=1, le=64 * 1024 * 1024)] = 1024 * 1024
    max_concurrency: Annotated[int, Field(ge=1, le=100_000)] = 1024
    # Replies go only to subjects under these prefixes (comma-separated).
    reply_prefixes: str = "_INBOX."
    # Labels a node may have, automatic ones included.
    max_labels: Annotated[int, Field(ge=4, le=10_000)] = 64
    # Node ids whose heartbeats are kept while the database is away.
    heartbeat_buffer: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000
    # Background work
    check_interval: Seconds = 15.0
    stale_after: Seconds = 60.0
    auto_offline: bool = False
    drain_interval: Seconds = 30.0
    backoff_base: Seconds = 30.0
    backoff_cap: Seconds = 900.0
    install_timeout: Seconds = 900.0
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 10
    # Process
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    embedded: bool = False
    state_dir: Path = Path(".registryd")

    @field_validator("nats_url")
    @classmethod
    def _nats_urls(cls, value: str) -> str:
        for url in nats_servers(value):
            parts = urlsplit(url)
            if parts.scheme not in _NATS_SCHEMES or not parts.hostname:
                raise ValueError(f"not a NATS URL: {url!r} (expected nats://host:port)")
            try:
                parts.port  # noqa: B018 - raises on a port that is not a number
            except ValueError as exc:
                raise ValueError(f"bad port in {url!r}") from exc
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if urlsplit(url).scheme not in _PG_SCHEMES:
            raise ValueError("not a PostgreSQL URL (expected postgresql://…)")
        return value

    @field_validator("subject_prefix")
    @classmethod
    def _subject_prefix(cls, value: str) -> str:
        if not value or not all(_SUBJECT_TOKEN.match(t) for t in value.split(".")):
            raise ValueError("must be NATS subject tokens separated by dots, without wildcards")
        return value

    @field_validator("reply_prefixes")
    @classmethod
    def _reply_prefixes(cls, value: str) -> str:
        prefixes = split_list(value)
        if not prefixes:
            raise ValueError("give at least one reply subject prefix, e.g. _INBOX.")
        for prefix in prefixes:
            if any(c in prefix for c in " \t\r\n*>") or prefix.startswith("."):
                raise ValueError(f"not a subject prefix: {prefix!r}")
        return value

    @field_validator("stream")
    @classmethod
    def _stream(cls, value: str) -> str:
        if not _STREAM_NAME.match(value):
            raise ValueError("a JetStream stream name is letters, digits, '-' and '_'")
        return value

    @field_validator("backoff_cap")
    @classmethod
    def _cap(cls, value: float, info: Any) -> float:
        base = info.data.get("backoff_base")
        if base is not None and value < base:
            raise ValueError("must not be smaller than REGISTRY_BACKOFF_BASE")
        return value

    @property
    def servers(self) -> list[str]:
        return nats_servers(self.nats_url)

    @property
    def reply_prefix_list(self) -> tuple[str, ...]:
        return tuple(split_list(self.reply_prefixes))


def split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def nats_servers(value: str) -> list[str]:
    servers = [s.strip() for s in value.split(",") if s.strip()]
    if not servers:
        raise ValueError("no NATS server given")
    return servers


FIELDS: tuple[str, ...] = tuple(Settings.model_fields)


def add_flags(parser: argparse.ArgumentParser, fields: tuple[str, ...] = FIELDS) -> None:
    """One flag per setting in `fields` (every one by default); absent flags
    leave the environment's value alone."""
    group = parser.add_argument_group("settings (each also REGISTRY_<NAME> in the environment)")
    for name in fields:
        info = Settings.model_fields[name]
        flag = "--" + name.replace("_", "-")
        if info.annotation is bool:
            group.add_argument(
                flag, nargs="?", const="true", default=argparse.SUPPRESS, metavar="BOOL"
            )
        else:
            group.add_argument(flag, default=argparse.SUPPRESS, metavar=name.upper())


def load(flags: Mapping[str, Any] | None = None) -> Settings:
    """The settings of this process: its REGISTRY_* environment, overridden by
    `flags` (a mapping of setting names; anything else in it is ignored)."""
    given = {name: value for name, value in (flags or {}).items() if name in FIELDS}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "settings"
        message = first["msg"].removeprefix("Value error, ")
        value = first.get("input")
        if isinstance(value, str | int | float) and field not in _SECRET_FIELDS:
            message = f"{message}, got {value!r}"
        raise SettingError(field, message) from None


_SECRET_FIELDS = {
    name for name, info in Settings.model_fields.items() if "SecretStr" in repr(info.annotation)
}


def nats_options(s: Settings, *, intents: bool = False) -> dict[str, Any]:
    """Connection options for the daemon and for `registryd call` alike;
    `intents` for the daemon's intents connection, which may be another user."""
    opts: dict[str, Any] = {"servers": s.servers, "name": "registryd"}
    own = intents and any((s.nats_intents_creds, s.nats_intents_nkey, s.nats_intents_user))
    creds = s.nats_intents_creds if own else s.nats_creds
    nkey = s.nats_intents_nkey if own else s.nats_nkey
    user = s.nats_intents_user if own else s.nats_user
    password = s.nats_intents_password if own else s.nats_password
    if creds:
        opts["user_credentials"] = str(creds)
    if nkey:
        seed = nkey.get_secret_value()
        if Path(seed).is_file():
            opts["nkeys_seed"] = seed
        else:
            opts["nkeys_seed_str"] = seed
    if user:
        opts["user"] = user
    if password:
        opts["password"] = password.get_secret_value()
    if s.nats_token:
        opts["token"] = s.nats_token.get_secret_value()
    if s.nats_tls_ca or s.nats_tls_cert:
        context = ssl.create_default_context(cafile=str(s.nats_tls_ca) if s.nats_tls_ca else None)
        if s.nats_tls_cert:
            context.load_cert_chain(
                str(s.nats_tls_cert), str(s.nats_tls_key) if s.nats_tls_key else None
            )
        opts["tls"] = context
    return opts
