"""Configuration: a TOML file, every field overridable from the environment.

Precedence, highest first: explicit overrides (CLI flags), environment variables
(``CAMPAIGND_DISPATCH__CONCURRENCY=128``), the TOML file, the defaults below.
A bad configuration raises :class:`ConfigError` whose message names each bad field;
the CLI turns it into exit code 2 so that systemd's ``RestartPreventExitStatus=2``
stops a crash loop.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

ENV_PREFIX = "CAMPAIGND_"
CONFIG_PATH_ENV = "CAMPAIGND_CONFIG"
SECRET_REFERENCE_PREFIX = "env:"


# Explicit overrides (CLI flags) for the Settings being built; see load_settings.
_OVERRIDES: ContextVar[dict[str, Any] | None] = ContextVar("campaignd_config_overrides", default=None)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the field and why."""


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True)


# A URL's password with one of these unencoded turns part of it into a "port" or a host.
_ENCODE_PASSWORD = "a '/', '#', '?' or '@' in a password must be percent-encoded (%2F, %23, %3F, %40)"
# The client's parse of a host in a URL's host list (asyncpg follows libpq): an IPv6
# address in brackets, or a name, each with an optional port.
_DSN_HOST = re.compile(r"(\[[^\]]+\]|[^:\[\]@]*)(?::([^:]*))?")


def check_database_url(url: str) -> None:
    """Refuse a URL the PostgreSQL client would misread, in words that never quote it.

    The URL usually carries the password. A ``/``, ``#``, ``?`` or ``@`` in a password that
    was not percent-encoded turns part of it into a "port", which the client then failed to
    parse, printing it in a traceback.
    """
    encode_hint = f"; {_ENCODE_PASSWORD}"
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"is not a URL the PostgreSQL client can read{encode_hint}") from None
    try:
        if parts.query:
            parse_qs(parts.query, strict_parsing=True)
    except ValueError:
        raise ValueError(
            "has parameters the PostgreSQL client cannot read (name=value, joined by &)"
        ) from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("must start with postgresql:// (or postgres://)")
    hosts = parts.netloc.partition("@")[2] if "@" in parts.netloc else parts.netloc
    if not hosts:
        return  # a Unix socket given as ?host=, or the client's defaults
    for host in hosts.split(","):
        match = _DSN_HOST.fullmatch(host)
        if match is None:
            raise ValueError(f"has a host the PostgreSQL client cannot read{encode_hint}")
        port = match.group(2)
        if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
            raise ValueError(f"has a port that is not a number from 1 to 65535{encode_hint}")


class DatabaseConfig(_Section):
    url: SecretStr = SecretStr("postgresql://localhost/campaignd")
    pool_size: int = Field(default=10, ge=2, le=500)
    # Session guards: a stuck query or a client that died mid-transaction must not hold
    # locks that every other daemon waits on. PostgreSQL takes them in whole milliseconds,
    # at most 2^31 - 1 of them (~24.8 days); 0 would mean no guard at all.
    statement_timeout_seconds: float = Field(default=30.0, ge=0.001, le=86_400)
    lock_timeout_seconds: float = Field(default=5.0, ge=0.001, le=86_400)
    idle_in_transaction_timeout_seconds: float = Field(default=60.0, ge=0.001, le=86_400)

    @field_validator("url")
    @classmethod
    def _readable_url(cls, value: SecretStr) -> SecretStr:
        check_database_url(value.get_secret_value())
        return value


class DispatchConfig(_Section):
    concurrency: int = Field(default=64, ge=1, le=100_000)
    batch_size: int = Field(default=500, ge=1, le=100_000)
    lease_seconds: float = Field(default=15.0, ge=1.0, le=3600.0)
    poll_seconds: float = Field(default=1.0, gt=0, le=3600.0)
    drain_seconds: float = Field(default=20.0, ge=0, le=3600.0)
    max_attempts: int = Field(default=5, ge=1, le=1000)
    backoff_base_seconds: float = Field(default=2.0, gt=0)
    backoff_max_seconds: float = Field(default=300.0, gt=0)
    # How often buffered outcomes are written when the buffer is not yet full.
    flush_seconds: float = Field(default=0.05, gt=0, le=10.0)
    # How often this daemon announces itself to its replicas and checks whether one of them
    # serves two lanes fewer and could take one of its own; 0 turns both off.
    rebalance_seconds: float = Field(default=10.0, ge=0, le=3600.0)
    owner: str = Field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}", min_length=1)

    @model_validator(mode="after")
    def _backoff_order(self) -> DispatchConfig:
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ValueError("backoff_max_seconds must be >= backoff_base_seconds")
        return self


class WatchdogConfig(_Section):
    interval_seconds: float = Field(default=10.0, gt=0, le=3600)
    # A SENDING campaign with pending work and no progress for this long is flagged stuck.
    stuck_after_seconds: float = Field(default=900.0, gt=0)


class HealthConfig(_Section):
    # host:port of the health/metrics server; empty disables it. Loopback by default:
    # exposing it elsewhere is the operator's explicit choice.
    listen: str = "127.0.0.1:9187"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value == "":
            return value
        host, separator, port = value.rpartition(":")
        if not separator or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port, e.g. 127.0.0.1:9187 (or empty to disable)")
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class LogConfig(_Section):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


def _resolve_env_reference(value: Any, what: str) -> Any:
    """A value written ``env:NAME`` is read from the environment, so secrets stay out of files.

    A secret ends up in request headers, where a line break would be refused by the HTTP client
    on every send (or worse, split the header): refused here, at start.
    """
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    source = ""
    if isinstance(text, str) and text.startswith(SECRET_REFERENCE_PREFIX):
        variable = text[len(SECRET_REFERENCE_PREFIX) :]
        if variable not in os.environ:
            raise ValueError(f"{what} refers to environment variable {variable} which is not set")
        text = os.environ[variable]
        source = f" (from environment variable {variable}: a trailing newline from a file?)"
    if isinstance(text, str) and any(ch in text for ch in "\r\n\x00"):
        raise ValueError(f"{what} contains a line break or NUL character{source}")
    return text


def _http_base(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    try:
        parts = urlsplit(value)
        host = parts.hostname
        if not host:
            raise ValueError("has no host")
        # What the resolver will do with it: a label over 63 characters, say, fails here
        # instead of on every send.
        host.encode("idna")
    except ValueError as exc:
        raise ValueError(f"is not a usable URL ({exc})") from None
    # Out of range or not a number, the port fails here instead of on every send. Python's
    # message quotes the "port", which may be the tail of a password (user:pass/word@host).
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(
            f"is not a usable URL (its port is not a number from 1 to 65535; {_ENCODE_PASSWORD})"
        )
    return value


# RFC 9110's token: what a header name may be made of.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class _SenderBase(_Section):
    rate_per_second: float = Field(default=50.0, gt=0, le=1_000_000)
    burst: int = Field(default=10, ge=1, le=1_000_000)
    timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    # Circuit breaker: a campaign whose recent failures are dominated by one error code is
    # paused instead of failing its recipients one by one. 0 disables a rule.
    breaker_consecutive_failures: int = Field(default=20, ge=0, le=1_000_000)
    breaker_window: int = Field(default=100, ge=0, le=1_000_000)
    breaker_failure_ratio: float = Field(default=0.9, gt=0, le=1)


class HttpSenderConfig(_SenderBase):
    provider: Literal["http"] = "http"
    url: str = Field(min_length=1)
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    # The generic provider sends an Idempotency-Key, so an in-doubt resend is safe.
    resend_in_doubt: bool = True

    _http_url = field_validator("url")(_http_base)

    @field_validator("headers", mode="before")
    @classmethod
    def _resolve_secret_references(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        for name in value:
            # A provider answers a malformed header name with a bare 400, which would fail
            # every recipient until the circuit breaker tripped.
            if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
                raise ValueError(
                    f"header name {name!r} is not a valid HTTP header name"
                    " (letters, digits and !#$%&'*+.^_`|~-)"
                )
        return {name: _resolve_env_reference(raw, f"header {name!r}") for name, raw in value.items()}


class _ApiSenderBase(_SenderBase):
    """A provider with its own API: a base URL (a local fake's, in tests) and a token."""

    api_base: str
    # None of these providers takes an idempotency key: an in-doubt resend may deliver twice,
    # so by default an interrupted send ends failed with error_code "in_doubt" instead.
    resend_in_doubt: bool = False

    @field_validator("api_base", mode="after")
    @classmethod
    def _api_base(cls, value: str) -> str:
        return _http_base(value).rstrip("/")

    @field_validator("access_token", "auth_token", mode="before", check_fields=False)
    @classmethod
    def _resolve_token(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve_env_reference(value, str(info.field_name))


class _MetaSenderBase(_ApiSenderBase):
    access_token: SecretStr
    api_base: str = "https://graph.facebook.com/v21.0"


class WhatsAppSenderConfig(_MetaSenderBase):
    provider: Literal["whatsapp"]
    phone_number_id: str = Field(pattern=r"^[0-9]{1,30}$")


class MessengerSenderConfig(_MetaSenderBase):
    """Messenger and Instagram share Meta's Send API."""

    provider: Literal["messenger", "instagram"]
    # The Page (or Instagram professional account) id; "me" means the token's own page.
    page_id: str = Field(default="me", pattern=r"^(me|[0-9]{1,30})$")
    # Defaults for messages that do not set their own.
    messaging_type: Literal["RESPONSE", "UPDATE", "MESSAGE_TAG"] = "UPDATE"
    tag: str | None = Field(default=None, pattern=r"^[A-Z_]{1,64}$")

    @model_validator(mode="after")
    def _tag_with_message_tag(self) -> MessengerSenderConfig:
        if self.messaging_type == "MESSAGE_TAG" and self.tag is None:
            raise ValueError('messaging_type "MESSAGE_TAG" needs a tag (e.g. "ACCOUNT_UPDATE")')
        return self


class TwilioSenderConfig(_ApiSenderBase):
    provider: Literal["twilio"]
    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$")
    auth_token: SecretStr
    messaging_service_sid: str | None = Field(default=None, pattern=r"^MG[0-9a-fA-F]{32}$")
    from_number: str | None = Field(default=None, pattern=r"^\+[1-9][0-9]{6,14}$")
    status_callback: str | None = None
    api_base: str = "https://api.twilio.com"

    @field_validator("status_callback")
    @classmethod
    def _callback_url(cls, value: str | None) -> str | None:
        return None if value is None else _http_base(value)

    @model_validator(mode="after")
    def _one_origin(self) -> TwilioSenderConfig:
        if (self.messaging_service_sid is None) == (self.from_number is None):
            raise ValueError("set exactly one of messaging_service_sid and from_number")
        return self


PROVIDERS = ("http", "whatsapp", "messenger", "instagram", "twilio")
_SENDER_TAGS = frozenset({"http", "whatsapp", "messenger", "twilio"})


def _provider_of(value: Any) -> str:
    # "http" is the default, so a section without `provider` keeps meaning the generic one.
    provider = value.get("provider", "http") if isinstance(value, dict) else getattr(value, "provider", None)
    return "messenger" if provider == "instagram" else str(provider)


SenderConfig = Annotated[
    Annotated[HttpSenderConfig, Tag("http")]
    | Annotated[WhatsAppSenderConfig, Tag("whatsapp")]
    | Annotated[MessengerSenderConfig, Tag("messenger")]
    | Annotated[TwilioSenderConfig, Tag("twilio")],
    Discriminator(
        _provider_of,
        custom_error_type="unknown_provider",
        custom_error_message=f"provider must be one of: {', '.join(PROVIDERS)}",
    ),
]
AnySenderConfig = HttpSenderConfig | WhatsAppSenderConfig | MessengerSenderConfig | TwilioSenderConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    database: DatabaseConfig = DatabaseConfig()
    dispatch: DispatchConfig = DispatchConfig()
    log: LogConfig = LogConfig()
    watchdog: WatchdogConfig = WatchdogConfig()
    health: HealthConfig = HealthConfig()
    senders: dict[str, SenderConfig] = Field(default_factory=dict)

    @field_validator("senders")
    @classmethod
    def _sender_ids(cls, value: dict[str, SenderConfig]) -> dict[str, SenderConfig]:
        for sender_id in value:
            if (
                not sender_id
                or len(sender_id) > 100
                or not sender_id.replace("-", "").replace("_", "").isalnum()
            ):
                raise ValueError(f"sender id {sender_id!r} must be 1-100 letters, digits, '-' or '_'")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: explicit overrides, the environment, then the TOML file (which
        # arrives as init values, see load_settings).
        overrides = InitSettingsSource(settings_cls, init_kwargs=_OVERRIDES.get() or {})
        return (overrides, env_settings, init_settings)


def _describe_location(location: tuple[int | str, ...]) -> str:
    # pydantic puts the provider's union tag after the sender id ("senders.wa.whatsapp.x");
    # operators wrote "senders.wa.x".
    if len(location) > 2 and location[0] == "senders" and location[2] in _SENDER_TAGS:
        location = location[:2] + location[3:]
    return ".".join(str(part) for part in location) or "(top level)"


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for problem in error.errors(include_url=False, include_input=False):
        location = problem["loc"]
        if problem["type"] == "unknown_provider":
            # The union reports the whole section; the field at fault is its provider.
            location = (*location, "provider")
        lines.append(f"  {_describe_location(location)}: {problem['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc


def _settings_error_field(error: SettingsError) -> str:
    """The field a SettingsError names (``error parsing value for field "database" ...``)."""
    match = re.search(r'field "([^"]+)"', str(error))
    name = match.group(1) if match else "(unknown field)"
    return f"{name} (from environment variable {ENV_PREFIX}{name.upper()})"


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build settings from a file (or ``$CAMPAIGND_CONFIG``), the environment and overrides."""
    if path is None and os.environ.get(CONFIG_PATH_ENV):
        path = Path(os.environ[CONFIG_PATH_ENV])
    file_values = read_toml(path) if path is not None else {}
    if not isinstance(file_values, dict):
        raise ConfigError("config file must be a TOML table")
    token = _OVERRIDES.set(overrides)
    try:
        return Settings(**file_values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except SettingsError as exc:
        # An environment variable holding a section (CAMPAIGND_DATABASE='{...') that is not
        # JSON; the message names the field, never the value.
        raise ConfigError(f"invalid configuration:\n  {_settings_error_field(exc)}: not valid JSON") from None
    finally:
        _OVERRIDES.reset(token)
