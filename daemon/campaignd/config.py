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
import ssl
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

import yarl
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
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
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
    # inf and nan are never a usable duration or count (they reached PostgreSQL intervals),
    # and a nan was reported as out of range: both are refused as "not a finite number".
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# A URL's password with one of these unencoded turns part of it into a "port" or a host.
_ENCODE_PASSWORD = "a '/', '#', '?' or '@' in a password must be percent-encoded (%2F, %23, %3F, %40)"
# The client's parse of a host in a URL's host list (asyncpg follows libpq): an IPv6
# address in brackets, or a name, each with an optional port.
_DSN_HOST = re.compile(r"(\[[^\]]+\]|[^:\[\]@]*)(?::([^:]*))?")


# The values asyncpg accepts for the URL parameters it reads itself (asyncpg/connect_utils.py;
# libpq's spellings, plus the underscore forms of sslmode asyncpg also takes). Anything else
# fails every connection with ClientConfigurationError, which the daemon used to retry forever
# as if the database were down. asyncpg's own parser is private (_parse_connect_dsn_and_args,
# whose signature changes between releases) and reads ~/.pgpass, service files and
# certificates as it goes, so the values are checked here instead.
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_DSN_CHOICES: dict[str, tuple[str, ...]] = {
    "sslmode": (*_SSLMODES, "verify_ca", "verify_full"),
    "sslnegotiation": ("postgres", "direct"),
    "target_session_attrs": ("any", "primary", "standby", "prefer-standby", "read-write", "read-only"),
    "gsslib": ("gssapi", "sspi"),
}
_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < int(text) <= 65535


def _check_dsn_parameters(query: dict[str, list[str]], hosts_in_netloc: bool) -> None:
    # Never quotes a value: a password (or part of one) may have landed in any parameter.
    # asyncpg reads the last of a repeated parameter.
    values = {name: given[-1] for name, given in query.items()}
    for name, choices in _DSN_CHOICES.items():
        if name in values and values[name] not in choices:
            shown = _SSLMODES if name == "sslmode" else choices
            raise ValueError(f"parameter {name} must be one of: {', '.join(shown)}")
    for name in ("ssl_min_protocol_version", "ssl_max_protocol_version"):
        version = values.get(name)
        # asyncpg looks the value up in ssl.TLSVersion, "." read as "_", and refuses SSL*.
        if version is not None and (
            version.startswith("SSL") or version.replace(".", "_") not in ssl.TLSVersion.__members__
        ):
            raise ValueError(f"parameter {name} must be one of: {', '.join(_TLS_VERSIONS)}")
    if values.get("sslnegotiation") == "direct":
        sslmode = values.get("sslmode") or os.environ.get("PGSSLMODE") or "prefer"
        if sslmode.replace("_", "-") not in ("require", "verify-ca", "verify-full"):
            raise ValueError(
                "parameter sslnegotiation=direct needs sslmode=require, verify-ca or verify-full"
            )
    sslmode = (values.get("sslmode") or os.environ.get("PGSSLMODE") or "prefer").replace("_", "-")
    if sslmode in ("require", "verify-ca", "verify-full"):
        # Opened at each connection attempt when TLS is required: a missing one failed with
        # FileNotFoundError, an OSError, so retried forever as the database being down. Only
        # then: with a weaker sslmode asyncpg opens none of them, and a key only beside its
        # certificate; a configuration that worked must not be refused.
        names = ["sslrootcert", "sslcrl", "sslcert"] + (["sslkey"] if "sslcert" in values else [])
        for name in names:
            path = values.get(name) or os.environ.get(f"PG{name.upper()}")
            if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise ValueError(f"parameter {name} (or PG{name.upper()}) must name a readable file")
    if "port" in values and not all(_is_port(port) for port in values["port"].split(",")):
        raise ValueError("parameter port must be a number from 1 to 65535 (or a comma-separated list)")
    # Hosts in the URL's authority win over ?host= and ?port= (asyncpg ignores both then).
    if not hosts_in_netloc and values.get("host"):
        hosts = values["host"].split(",")
        if not all(hosts):
            raise ValueError("parameter host has an empty entry in its list")
        ports = values["port"].split(",") if values.get("port") else []
        if len(ports) > 1 and len(ports) != len(hosts):
            raise ValueError("parameter port must give one port, or one per host")


def check_database_url(url: str) -> None:
    """Refuse a URL the PostgreSQL client would misread or refuse, in words that never quote it.

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
        query = parse_qs(parts.query, strict_parsing=True) if parts.query else {}
    except ValueError:
        raise ValueError(
            "has parameters the PostgreSQL client cannot read (name=value, joined by &)"
        ) from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("must start with postgresql:// (or postgres://)")
    hosts = parts.netloc.partition("@")[2] if "@" in parts.netloc else parts.netloc
    _check_dsn_parameters(query, hosts_in_netloc=bool(hosts))
    if not hosts:
        return  # a Unix socket given as ?host=, or the client's defaults
    if "," in hosts and not all(hosts.split(",")):
        # asyncpg reads a host's first character: an empty one failed with an IndexError.
        raise ValueError("has an empty entry in its host list")
    for host in hosts.split(","):
        match = _DSN_HOST.fullmatch(host)
        if match is None:
            raise ValueError(f"has a host the PostgreSQL client cannot read{encode_hint}")
        port = match.group(2)
        if port is not None and not _is_port(port):
            raise ValueError(f"has a port that is not a number from 1 to 65535{encode_hint}")


class DatabaseConfig(_Section):
    url: SecretStr = SecretStr("postgresql://localhost/campaignd")
    pool_size: int = Field(default=10, ge=2, le=500)
    # Session guards: a stuck query or a client that died mid-transaction must not hold
    # locks that every other daemon waits on. PostgreSQL takes them in whole milliseconds,
    # at most 2^31 - 1 of them (~24.8 days); 0 would mean no guard at all.
    statement_timeout_seconds: float = Field(default=30.0, ge=0.001, le=86_400)
    lock_timeout_seconds: float = Field(default=5.0, ge=0.001, le=86_400)
    # The daemon's transactions are milliseconds of work; one left open this long is a client
    # that froze or went away inside it. Its locks hold up a takeover of its lane (the sender's
    # row) until the server ends it: at the lease's length, a frozen owner is replaced as fast
    # whether or not the freeze landed in a transaction.
    idle_in_transaction_timeout_seconds: float = Field(default=15.0, ge=0.001, le=86_400)

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
    # A retry is scheduled as now() + make_interval(secs => delay) and shown by `doctor` as a
    # Python datetime: without a bound, inf overflowed the interval (the lane crash-looped,
    # resending) and 1e12 s a datetime. A retry more than a day out is a campaign abandoned,
    # not a backoff, so a day is the cap.
    backoff_base_seconds: float = Field(default=2.0, gt=0, le=86_400)
    backoff_max_seconds: float = Field(default=300.0, gt=0, le=86_400)
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
    # Each pass computes now() - make_interval(secs => this): inf made every pass fail
    # ("interval out of range"). A campaign idle for a month is long past needing a flag.
    stuck_after_seconds: float = Field(default=900.0, gt=0, le=2_592_000)


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
    # Every message here is fixed: the URL may carry a password (https://user:pass@host/),
    # and the parser's own messages quote whatever part of it they choke on.
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        raise ValueError(
            "is not a usable URL (it cannot be parsed; a '[', ']', '/', '#', '?' or '@' in a user"
            " name or password must be percent-encoded)"
        ) from None
    if not host:
        raise ValueError("is not a usable URL (it has no host)")
    try:
        # What the resolver will do with it: a label over 63 characters, say, fails here
        # instead of on every send.
        host.encode("idna")
    except ValueError:
        raise ValueError("is not a usable URL (its host is not a name the resolver can look up)") from None
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
    try:
        # The HTTP client's own parser is stricter than urlsplit: what it refuses here paused
        # the sender at its first send, with the whole URL (password and all) in the reason.
        yarl.URL(value)
    except ValueError:
        raise ValueError(
            "is not a usable URL (the HTTP client refuses it: a backslash, a blank or another"
            " character a URL cannot hold, in the user name, password or host, must be"
            " percent-encoded)"
        ) from None
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
    # A sender whose every answer has been a throttle for this long is paused with that reason,
    # its recipients pending and unspent: a provider that never lets up (a quota spent, a proxy
    # that answers 429 to everything) is not asked again and again for ever. Longer than a few
    # of the longest waits a provider may ask for (1 h) and than a maintenance window's 503s,
    # which used to pass by themselves and should still. 0 disables it.
    throttle_pause_after_seconds: float = Field(default=14_400.0, ge=0, le=604_800)


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
        seen: dict[str, str] = {}
        for name in value:
            # A provider answers a malformed header name with a bare 400, which would fail
            # every recipient until the circuit breaker tripped.
            if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
                raise ValueError(
                    f"header name {name!r} is not a valid HTTP header name"
                    " (letters, digits and !#$%&'*+.^_`|~-)"
                )
            # Header names are case-insensitive: both would be sent, and which one the
            # provider reads is anyone's guess.
            if name.lower() in seen:
                raise ValueError(
                    f"headers {seen[name.lower()]!r} and {name!r} are the same header"
                    " (header names are case-insensitive)"
                )
            seen[name.lower()] = name
        return {name: _resolve_env_reference(raw, f"header {name!r}") for name, raw in value.items()}

    @model_validator(mode="after")
    def _one_way_to_log_in(self) -> HttpSenderConfig:
        # The HTTP client refuses a request with both, so every send would fail.
        parts = urlsplit(self.url)
        if (parts.username or parts.password) and any(
            name.lower() == "authorization" for name in self.headers
        ):
            raise ValueError(
                "url carries a user name or password and headers set Authorization:"
                " a request can log in only one way; keep one of them"
            )
        return self


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
        allow_inf_nan=False,
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
        return (overrides, _EnvironmentSource(settings_cls, env_settings, init_settings), init_settings)


def _as_spelled_in(name: str, spellings: dict[Any, Any]) -> list[str]:
    if name in spellings and name != name.lower():
        return [name]  # from a JSON value, which keeps its case
    return [key for key in spellings if isinstance(key, str) and key.lower() == name.lower()]


def _merge(low: Any, high: Any) -> Any:
    if isinstance(low, dict) and isinstance(high, dict):
        return {**low, **{key: _merge(low.get(key), value) for key, value in high.items()}}
    return high


class _EnvironmentSource(PydanticBaseSettingsSource):
    """The environment's values, with sender ids and header names spelled as in the file.

    Variable names are read case-insensitively, so they arrive lower-cased: a sender
    ``[senders.SMS_EU]`` could not be overridden (the override made a new sender "sms_eu"),
    and a header override ``..._HEADERS__X-API-KEY`` was sent beside the file's
    ``X-Api-Key`` instead of replacing it. Matching ignores case, as HTTP does for header
    names; refusing upper-case sender ids instead would strand the campaigns that use them.
    """

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        environment: PydanticBaseSettingsSource,
        file: PydanticBaseSettingsSource,
    ) -> None:
        super().__init__(settings_cls)
        self._environment = environment
        self._file = file

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # not used: __call__ hands over the whole environment

    def __call__(self) -> dict[str, Any]:
        values = self._environment()
        senders = values.get("senders")
        file_senders = self._file().get("senders")
        if not isinstance(senders, dict) or not isinstance(file_senders, dict):
            return values
        spelled: dict[str, Any] = {}
        for sender_id, section in senders.items():
            matches = _as_spelled_in(sender_id, file_senders)
            if len(matches) > 1:
                raise ConfigError(
                    f"invalid configuration:\n  senders: the environment overrides sender {sender_id!r},"
                    f" and senders {' and '.join(map(repr, sorted(matches)))} differ only in case"
                    " (environment variable names do not keep case): rename one"
                )
            file_id = matches[0] if matches else sender_id
            file_section = file_senders.get(file_id)
            if isinstance(section, dict) and isinstance(file_section, dict):
                headers, file_headers = section.get("headers"), file_section.get("headers")
                if isinstance(headers, dict) and isinstance(file_headers, dict):
                    renamed: dict[str, Any] = {}
                    for name, value in headers.items():
                        names = _as_spelled_in(name, file_headers)
                        # Two spellings in the file are refused by the headers validator.
                        renamed[names[0] if len(names) == 1 else name] = value
                    section = {**section, "headers": renamed}
            spelled[file_id] = _merge(spelled.get(file_id), section)
        return {**values, "senders": spelled}


def _describe_location(location: tuple[int | str, ...]) -> str:
    # pydantic puts the provider's union tag after the sender id ("senders.wa.whatsapp.x");
    # operators wrote "senders.wa.x".
    if len(location) > 2 and location[0] == "senders" and location[2] in _SENDER_TAGS:
        location = location[:2] + location[3:]
    return ".".join(str(part) for part in location) or "(top level)"


def format_validation_error(error: ValidationError) -> str:
    lines = []
    # Inputs are looked at, never printed: they may be secrets.
    for problem in error.errors(include_url=False):
        location = problem["loc"]
        message = problem["msg"]
        if problem["type"] == "unknown_provider":
            if isinstance(problem.get("input"), dict):
                # The union reports the whole section; the field at fault is its provider.
                location = (*location, "provider")
            else:
                # `[senders] sms = 5`: there is no provider to blame, the section is not one.
                message = "must be a table (a [senders.<id>] section), not a single value"
        lines.append(f"  {_describe_location(location)}: {message}")
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


def _unreadable_variables(error: SettingsError) -> str:
    """Where a SettingsError came from: each variable holding JSON that is not JSON.

    The error names only the top-level field ("senders"); the variable actually set may be
    CAMPAIGND_SENDERS__SMS__HEADERS. Each variable under that field is given alone to the
    same parser, so what counts as JSON is the parser's call, not a guess made here.
    """
    match = re.search(r'field "([^"]+)"', str(error))
    field = match.group(1) if match else ""
    prefix = f"{ENV_PREFIX}{field}".lower()
    culprits = []
    for variable, value in sorted(os.environ.items()):
        name = variable.lower()
        if not field or not (name == prefix or name.startswith(prefix + "__")):
            continue
        probe = EnvSettingsSource(Settings)
        probe.env_vars = {name: value}
        try:
            probe()
        except SettingsError:
            path = name[len(ENV_PREFIX) :].replace("__", ".")
            culprits.append(f"{path} (from environment variable {variable})")
    return "\n  ".join(f"{culprit}: not valid JSON" for culprit in culprits) or (
        f"{field or '(unknown field)'} (from the environment): not valid JSON"
    )


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
        raise ConfigError(f"invalid configuration:\n  {_unreadable_variables(exc)}") from None
    finally:
        _OVERRIDES.reset(token)
