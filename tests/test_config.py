"""Configuration: TOML file, environment overrides, validation messages, secrets, CLI exit codes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaignd.cli import build_parser, main
from campaignd.config import ConfigError, HttpSenderConfig, Settings, TwilioSenderConfig, load_settings
from tests.conftest import with_database

HEADER_SECRET = "hdr-secret-0123456789"
DB_PASSWORD = "dbpass-9876543210"

VALID = f"""
[database]
url = "postgresql://campaignd:{DB_PASSWORD}@db.internal:5432/campaignd"
pool_size = 4

[dispatch]
concurrency = 16
batch_size = 100

[log]
level = "INFO"

[senders.sms]
url = "https://sms.example.com/v1/send"
rate_per_second = 25.0
burst = 5
headers = {{ Authorization = "Bearer {HEADER_SECRET}", X-Tenant = "acme" }}
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read CAMPAIGND_* variables: none from the outer environment may leak in."""
    for name in list(os.environ):
        if name.upper().startswith("CAMPAIGND_"):
            monkeypatch.delenv(name)


def _write(tmp_path: Path, text: str, name: str = "campaignd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _sender_config(extra: str = "") -> str:
    return f'[senders.sms]\nurl = "https://sms.example.com/send"\n{extra}\n'


def _load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(_write(tmp_path, text))
    return str(caught.value)


# ----------------------------------------------------------------- loading


def test_valid_file_is_loaded(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, VALID))

    assert settings.dispatch.concurrency == 16
    assert settings.dispatch.batch_size == 100
    assert settings.database.pool_size == 4
    assert settings.log.level == "info"
    sms = settings.senders["sms"]
    assert sms.url == "https://sms.example.com/v1/send"
    assert (sms.rate_per_second, sms.burst) == (25.0, 5)
    assert sms.headers["Authorization"].get_secret_value() == f"Bearer {HEADER_SECRET}"
    assert sms.headers["X-Tenant"].get_secret_value() == "acme"


def test_defaults_apply_without_a_file() -> None:
    settings = load_settings(None)

    assert settings.dispatch.concurrency == 64
    assert settings.senders == {}
    assert settings.log.format == "json"


def test_config_path_may_come_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMPAIGND_CONFIG", str(_write(tmp_path, "[dispatch]\nconcurrency = 3\n")))

    assert load_settings().dispatch.concurrency == 3


def test_environment_overrides_file_and_keeps_other_file_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAMPAIGND_DISPATCH__CONCURRENCY", "7")

    settings = load_settings(_write(tmp_path, VALID))

    assert settings.dispatch.concurrency == 7
    assert settings.dispatch.batch_size == 100


def test_environment_overrides_one_sender_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMPAIGND_SENDERS__SMS__RATE_PER_SECOND", "3.5")

    settings = load_settings(_write(tmp_path, VALID))

    sms = settings.senders["sms"]
    assert sms.rate_per_second == 3.5
    assert sms.burst == 5
    assert sms.url == "https://sms.example.com/v1/send"


def test_invalid_environment_value_names_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMPAIGND_DISPATCH__CONCURRENCY", "0")

    with pytest.raises(ConfigError, match=r"dispatch\.concurrency"):
        load_settings(_write(tmp_path, VALID))


def test_overrides_merge_into_file_values(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, VALID), {"log": {"level": "error"}})

    assert settings.log.level == "error"
    assert settings.dispatch.concurrency == 16
    assert settings.senders["sms"].headers["Authorization"].get_secret_value() == f"Bearer {HEADER_SECRET}"


def test_explicit_overrides_beat_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMPAIGND_LOG__LEVEL", "debug")

    settings = load_settings(_write(tmp_path, VALID), {"log": {"level": "error"}})

    assert settings.log.level == "error"


def test_env_header_reference_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMS_TOKEN_FOR_TEST", "Bearer from-env-123456")

    settings = load_settings(
        _write(tmp_path, _sender_config('headers = { Authorization = "env:SMS_TOKEN_FOR_TEST" }'))
    )

    assert settings.senders["sms"].headers["Authorization"].get_secret_value() == "Bearer from-env-123456"


def test_missing_env_header_reference_names_the_headers_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SMS_TOKEN_NOT_SET_ANYWHERE", raising=False)

    message = _load_error(
        tmp_path, _sender_config('headers = { Authorization = "env:SMS_TOKEN_NOT_SET_ANYWHERE" }')
    )

    assert "senders.sms.headers" in message
    assert "SMS_TOKEN_NOT_SET_ANYWHERE" in message


@pytest.mark.parametrize("provider_section", ["whatsapp", "messenger", "instagram"])
def test_missing_env_token_reference_names_the_token_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, provider_section: str
) -> None:
    monkeypatch.delenv("META_TOKEN_NOT_SET_ANYWHERE", raising=False)
    text = (
        f'[senders.meta]\nprovider = "{provider_section}"\nphone_number_id = "1"\n'
        'access_token = "env:META_TOKEN_NOT_SET_ANYWHERE"\n'
    )
    if provider_section != "whatsapp":
        text = text.replace('phone_number_id = "1"\n', "")

    message = _load_error(tmp_path, text)

    assert "senders.meta.access_token" in message
    assert "META_TOKEN_NOT_SET_ANYWHERE" in message


def test_provider_tokens_are_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWILIO_TOKEN_FOR_TEST", "twilio-secret-value")
    path = _write(
        tmp_path,
        f'[senders.tw]\nprovider = "twilio"\naccount_sid = "AC{"a" * 32}"\n'
        'auth_token = "env:TWILIO_TOKEN_FOR_TEST"\nfrom_number = "+15017122661"\n',
    )

    sender = load_settings(path).senders["tw"]

    assert isinstance(sender, TwilioSenderConfig)
    assert sender.auth_token.get_secret_value() == "twilio-secret-value"
    assert sender.resend_in_doubt is False
    assert "twilio-secret-value" not in repr(sender)


def test_secret_with_a_trailing_newline_is_refused_without_quoting_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `echo token > file` then EnvironmentFile: the classic way a token gains a newline.
    monkeypatch.setenv("SMS_TOKEN_WITH_NEWLINE", "Bearer secret-value-42\n")

    message = _load_error(
        tmp_path, _sender_config('headers = { Authorization = "env:SMS_TOKEN_WITH_NEWLINE" }')
    )

    assert "senders.sms.headers" in message
    assert "line break" in message and "SMS_TOKEN_WITH_NEWLINE" in message
    assert "secret-value-42" not in message


@pytest.mark.parametrize("url", ["http://" + "a" * 64 + ".example/send", "http:///send", "https://:443/send"])
def test_url_without_a_usable_host_is_refused(tmp_path: Path, url: str) -> None:
    message = _load_error(tmp_path, f'[senders.sms]\nurl = "{url}"\n')

    assert "senders.sms.url" in message and "usable URL" in message


def test_a_sender_without_provider_is_generic_http(tmp_path: Path) -> None:
    sender = load_settings(_write(tmp_path, _sender_config())).senders["sms"]

    assert isinstance(sender, HttpSenderConfig)
    assert sender.resend_in_doubt is True


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[dispatch]\nconcurrncy = 5\n", "dispatch.concurrncy"),
        ("[database]\nurll = 'x'\n", "database.urll"),
        ("unknown_top = 1\n", "unknown_top"),
        (_sender_config("rate = 5"), "senders.sms.rate"),
    ],
)
def test_unknown_key_is_refused_by_name(tmp_path: Path, text: str, field: str) -> None:
    assert field in _load_error(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[dispatch]\nconcurrency = 0\n", "dispatch.concurrency"),
        ("[dispatch]\nlease_seconds = 0\n", "dispatch.lease_seconds"),
        ("[dispatch]\nmax_attempts = 0\n", "dispatch.max_attempts"),
        ("[dispatch]\nbatch_size = 'many'\n", "dispatch.batch_size"),
        ("[database]\npool_size = 1\n", "database.pool_size"),
        ("[log]\nlevel = 'loud'\n", "log.level"),
        (_sender_config("rate_per_second = -1.0"), "senders.sms.rate_per_second"),
        (_sender_config("burst = 0"), "senders.sms.burst"),
        (_sender_config("timeout_seconds = 0"), "senders.sms.timeout_seconds"),
        ('[senders.sms]\nurl = "sms.example.com/send"\n', "senders.sms.url"),
        ('[senders.sms]\nurl = "ftp://sms.example.com/send"\n', "senders.sms.url"),
        ("[senders.sms]\nburst = 3\n", "senders.sms.url"),
        (_sender_config("provider = 'smtp'"), "senders.sms.provider"),
        (_sender_config("breaker_failure_ratio = 1.5"), "senders.sms.breaker_failure_ratio"),
        (_sender_config("breaker_window = -1"), "senders.sms.breaker_window"),
        ('[senders.wa]\nprovider = "whatsapp"\naccess_token = "t"\n', "senders.wa.phone_number_id"),
        (
            '[senders.wa]\nprovider = "whatsapp"\naccess_token = "t"\nphone_number_id = "+1 555"\n',
            "senders.wa.phone_number_id",
        ),
        ('[senders.wa]\nprovider = "whatsapp"\nphone_number_id = "1"\n', "senders.wa.access_token"),
        (
            '[senders.wa]\nprovider = "whatsapp"\nphone_number_id = "1"\naccess_token = "t"\n'
            'api_base = "graph.facebook.com"\n',
            "senders.wa.api_base",
        ),
        (
            '[senders.fb]\nprovider = "messenger"\naccess_token = "t"\nmessaging_type = "MESSAGE_TAG"\n',
            "senders.fb",
        ),
        ('[senders.ig]\nprovider = "instagram"\naccess_token = "t"\npage_id = "abc"\n', "senders.ig.page_id"),
        (
            f'[senders.tw]\nprovider = "twilio"\naccount_sid = "AC{"0" * 32}"\nauth_token = "t"\n',
            "senders.tw",
        ),
        (
            f'[senders.tw]\nprovider = "twilio"\naccount_sid = "AC{"0" * 32}"\nauth_token = "t"\n'
            f'from_number = "+15550001"\nmessaging_service_sid = "MG{"0" * 32}"\n',
            "senders.tw",
        ),
        (
            '[senders.tw]\nprovider = "twilio"\naccount_sid = "123"\nauth_token = "t"\n'
            'from_number = "+15550001"\n',
            "senders.tw.account_sid",
        ),
    ],
)
def test_invalid_value_error_names_the_dotted_field(tmp_path: Path, text: str, field: str) -> None:
    message = _load_error(tmp_path, text)

    assert message.startswith("invalid configuration")
    assert field in message


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (_sender_config('headers = { "X Api Key" = "k" }'), "senders.sms.headers"),
        (_sender_config('headers = { "" = "k" }'), "senders.sms.headers"),
        (_sender_config('headers = { "Clé" = "k" }'), "senders.sms.headers"),
        ('[senders.sms]\nurl = "https://sms.example.com:99999/send"\n', "senders.sms.url"),
        ('[senders.sms]\nurl = "https://sms.example.com:abc/send"\n', "senders.sms.url"),
        ('[senders.sms]\nurl = "https://sms.example.com:0/send"\n', "senders.sms.url"),
        (
            '[senders.wa]\nprovider = "whatsapp"\nphone_number_id = "1"\naccess_token = "t"\n'
            'api_base = "https://graph.facebook.com:99999/v21.0"\n',
            "senders.wa.api_base",
        ),
        ("[database]\nstatement_timeout_seconds = 2592000\n", "database.statement_timeout_seconds"),
        ("[database]\nlock_timeout_seconds = inf\n", "database.lock_timeout_seconds"),
        (
            "[database]\nidle_in_transaction_timeout_seconds = 0.0001\n",
            "database.idle_in_transaction_timeout_seconds",
        ),
    ],
)
def test_values_that_only_failed_at_use_are_refused_by_name(tmp_path: Path, text: str, field: str) -> None:
    # Each of these used to load, then fail every send (a header name or port aiohttp or the
    # provider refuses) or the first connection (a timeout PostgreSQL cannot take), or turn a
    # guard off (0.0001 s became "0", PostgreSQL's "no timeout").
    message = _load_error(tmp_path, text)

    assert message.startswith("invalid configuration")
    assert field in message


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://campaignd:{DB_PASSWORD}/x@db.internal:5432/campaignd",
        f"postgresql://campaignd:{DB_PASSWORD}#x@db.internal:5432/campaignd",
        f"postgresql://campaignd:{DB_PASSWORD}?x@db.internal:5432/campaignd",
        f"postgresql://campaignd:{DB_PASSWORD}@x@db.internal:5432/campaignd",
        f"postgresql://campaignd:{DB_PASSWORD}@[::1/campaignd",
        f"mysql://campaignd:{DB_PASSWORD}@db.internal/campaignd",
        f"postgresql://campaignd:{DB_PASSWORD}@db.internal/campaignd?sslmode",
    ],
)
def test_a_database_url_the_client_would_misread_is_refused_without_quoting_it(
    tmp_path: Path, url: str
) -> None:
    # A password with an unencoded '/', '#', '?' or '@' used to reach asyncpg, whose parse
    # failed with a traceback quoting part of the password.
    message = _load_error(tmp_path, f'[database]\nurl = "{url}"\n')

    assert "database.url" in message
    assert DB_PASSWORD not in message and "dbpass" not in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://campaignd:p%2Fw%40d@db.internal:5432/campaignd",
        "postgres://db.internal/campaignd?sslmode=require",
        "postgresql://postgres@/postgres?host=/tmp/pg&port=5433",
        "postgresql://u@h1:5432,h2:5433/db",
        "postgresql://u@[::1]:5432/db",
        "postgresql:///campaignd",
    ],
)
def test_database_urls_the_client_reads_are_accepted(tmp_path: Path, url: str) -> None:
    settings = load_settings(_write(tmp_path, f'[database]\nurl = "{url}"\n'))

    assert settings.database.url.get_secret_value() == url


def test_a_provider_url_whose_password_reads_as_a_port_is_refused_without_quoting_it(
    tmp_path: Path,
) -> None:
    message = _load_error(
        tmp_path, f'[senders.sms]\nurl = "https://campaignd:{DB_PASSWORD}/x@sms.example.com/send"\n'
    )

    assert "senders.sms.url" in message and "port" in message
    assert DB_PASSWORD not in message and "dbpass" not in message


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"\xff\xfe[dispatch]\nconcurrency = 3\n")

    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(path)


@pytest.mark.parametrize("variable", ["CAMPAIGND_DATABASE", "CAMPAIGND_SENDERS"])
def test_a_section_in_the_environment_that_is_not_json_names_the_field(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, f'{{"url": "postgresql://u:{DB_PASSWORD}@h/db"')

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert variable in str(caught.value)
    assert DB_PASSWORD not in str(caught.value)


def test_every_bad_field_is_reported_at_once(tmp_path: Path) -> None:
    message = _load_error(
        tmp_path, "[dispatch]\nconcurrency = 0\nlease_seconds = 0\n" + _sender_config("burst = 0")
    )

    assert "dispatch.concurrency" in message
    assert "dispatch.lease_seconds" in message
    assert "senders.sms.burst" in message


def test_backoff_max_below_base_is_refused(tmp_path: Path) -> None:
    message = _load_error(tmp_path, "[dispatch]\nbackoff_base_seconds = 10\nbackoff_max_seconds = 1\n")

    assert "dispatch" in message
    assert "backoff_max_seconds" in message


def test_bad_sender_id_is_refused(tmp_path: Path) -> None:
    message = _load_error(tmp_path, '[senders."bad id!"]\nurl = "https://x/"\n')

    assert "senders" in message
    assert "bad id!" in message


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[dispatch\nconcurrency = = 3\n", "broken.toml")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(path) in str(caught.value)
    assert "TOML" in str(caught.value)


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"

    with pytest.raises(ConfigError, match="does not exist") as caught:
        load_settings(path)

    assert str(path) in str(caught.value)


def test_directory_as_config_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings(tmp_path)


@settings(max_examples=25, deadline=None)
@given(concurrency=st.integers(max_value=0))
def test_any_non_positive_concurrency_is_refused(
    concurrency: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("concurrency") / "c.toml"
    path.write_text(f"[dispatch]\nconcurrency = {concurrency}\n")

    with pytest.raises(ConfigError, match=r"dispatch\.concurrency"):
        load_settings(path)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (
            "[dispatch]\nbackoff_base_seconds = inf\nbackoff_max_seconds = inf\n",
            "dispatch.backoff_base_seconds",
        ),
        ("[dispatch]\nbackoff_max_seconds = inf\n", "dispatch.backoff_max_seconds"),
        (
            "[dispatch]\nbackoff_base_seconds = 1e12\nbackoff_max_seconds = 1e12\n",
            "dispatch.backoff_max_seconds",
        ),
        ("[dispatch]\nbackoff_max_seconds = 86401\n", "dispatch.backoff_max_seconds"),
        ("[watchdog]\nstuck_after_seconds = inf\n", "watchdog.stuck_after_seconds"),
        ("[watchdog]\nstuck_after_seconds = 2592001\n", "watchdog.stuck_after_seconds"),
    ],
)
def test_durations_beyond_what_intervals_and_datetimes_hold_are_refused(
    tmp_path: Path, text: str, field: str
) -> None:
    # backoff = inf crash-looped the lane (interval out of range, recipient resent each time),
    # stuck_after = inf failed every watchdog pass, backoff = 1e12 made `doctor` overflow.
    message = _load_error(tmp_path, text)

    assert message.startswith("invalid configuration")
    assert field in message


def test_the_largest_allowed_durations_load(tmp_path: Path) -> None:
    settings = load_settings(
        _write(
            tmp_path,
            "[dispatch]\nbackoff_base_seconds = 86400\nbackoff_max_seconds = 86400\n"
            "[watchdog]\nstuck_after_seconds = 2592000\n",
        )
    )

    assert settings.dispatch.backoff_max_seconds == 86_400
    assert settings.watchdog.stuck_after_seconds == 2_592_000


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[dispatch]\nlease_seconds = nan\n", "dispatch.lease_seconds"),
        ("[dispatch]\npoll_seconds = nan\n", "dispatch.poll_seconds"),
        ("[watchdog]\nstuck_after_seconds = nan\n", "watchdog.stuck_after_seconds"),
        (_sender_config("breaker_failure_ratio = nan"), "senders.sms.breaker_failure_ratio"),
        (_sender_config("rate_per_second = inf"), "senders.sms.rate_per_second"),
    ],
)
def test_nan_and_inf_are_named_as_not_finite_numbers(tmp_path: Path, text: str, field: str) -> None:
    # nan used to be reported as "less than or equal to 3600", as if it were merely too large.
    message = _load_error(tmp_path, text)

    assert f"{field}: Input should be a finite number" in message
    assert "less than" not in message


def test_nan_from_the_environment_is_named_as_not_a_finite_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAMPAIGND_DISPATCH__LEASE_SECONDS", "nan")

    message = _load_error(tmp_path, "")

    assert "dispatch.lease_seconds: Input should be a finite number" in message


def test_an_http_sender_cannot_log_in_by_its_url_and_an_authorization_header_at_once(tmp_path: Path) -> None:
    # The HTTP client refuses such a request: every send paused the sender.
    message = _load_error(
        tmp_path,
        '[senders.sms]\nurl = "https://user:pw@provider.example/v1"\n'
        'headers = { authorization = "Bearer abcdef123" }\n',
    )

    assert (
        "senders.sms: Value error, url carries a user name or password and headers set Authorization"
        in message
    )
    assert "abcdef123" not in message and ":pw@" not in message


@pytest.mark.parametrize(
    "url",
    [
        "https://user:S3\\\\SECRETPART@provider.example/v1",
        "https://user:SECRETPART@provider.example\\\\@evil/v1",
        "https://user:SECRETPART@pro\\u200bvider.example/v1",
    ],
)
def test_a_provider_url_the_http_client_refuses_is_refused_at_load(tmp_path: Path, url: str) -> None:
    # Accepted here, it paused the sender at its first send, the whole URL in the reason.
    message = _load_error(tmp_path, f'[senders.sms]\nurl = "{url}"\n')

    assert "senders.sms.url: Value error, is not a usable URL (the HTTP client refuses it" in message
    assert "SECRETPART" not in message


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('[senders.sms]\nurl = "https://user:to[SECRETPART]ken@provider.example/v1"\n', "senders.sms.url"),
        (
            f'[senders.tw]\nprovider = "twilio"\naccount_sid = "AC{"a" * 32}"\nauth_token = "x"\n'
            'from_number = "+15017122661"\nstatus_callback = "https://user:pa[SECRETPART]ss@app.example/cb"\n',
            "senders.tw.status_callback",
        ),
        (
            '[senders.wa]\nprovider = "whatsapp"\nphone_number_id = "1"\naccess_token = "x"\n'
            'api_base = "https://u:p[SECRETPART]@graph/x"\n',
            "senders.wa.api_base",
        ),
    ],
)
def test_a_provider_url_the_parser_rejects_is_refused_without_quoting_it(
    tmp_path: Path, text: str, field: str
) -> None:
    # urlsplit's own message quoted the bracketed part, here a piece of the password.
    message = _load_error(tmp_path, text)

    assert f"{field}: Value error, is not a usable URL" in message
    assert "SECRETPART" not in message


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("?sslmode=bogus", "sslmode must be one of"),
        ("?sslmode=require&target_session_attrs=master", "target_session_attrs must be one of"),
        ("?sslnegotiation=tls", "sslnegotiation must be one of"),
        ("?sslnegotiation=direct&sslmode=prefer", "sslnegotiation=direct needs sslmode=require"),
        ("?gsslib=krb5", "gsslib must be one of"),
        ("?ssl_min_protocol_version=TLSv9", "ssl_min_protocol_version must be one of"),
        ("?ssl_max_protocol_version=SSLv3", "ssl_max_protocol_version must be one of"),
        (
            "?sslmode=verify-full&sslrootcert=/nonexistent/root.crt",
            "sslrootcert (or PGSSLROOTCERT) must name",
        ),
    ],
)
def test_a_database_url_parameter_the_client_refuses_is_a_config_error(
    tmp_path: Path, query: str, reason: str
) -> None:
    # asyncpg refuses these at every connection attempt (ClientConfigurationError, or for a
    # missing certificate FileNotFoundError), which the daemon retried forever as an outage.
    url = f"postgresql://campaignd:{DB_PASSWORD}@db.internal:5432/campaignd{query}"

    message = _load_error(tmp_path, f'[database]\nurl = "{url}"\n')

    assert f"database.url: Value error, parameter {reason}" in message
    assert DB_PASSWORD not in message


@pytest.mark.parametrize(
    "query",
    [
        # asyncpg opens none of these files unless TLS is required, and a key only beside its
        # certificate: each of these connects (or fails for the database's own reasons).
        "?sslrootcert=/nonexistent/root.crt",
        "?sslmode=allow&sslcrl=/nonexistent/crl.pem",
        "?sslmode=prefer&sslcert=/nonexistent/client.crt",
        "?sslmode=require&sslkey=/nonexistent/client.key",
        "?sslmode=disable&sslrootcert=/nonexistent/root.crt",
    ],
)
def test_certificate_files_asyncpg_would_not_open_are_not_checked(tmp_path: Path, query: str) -> None:
    url = f"postgresql://campaignd:{DB_PASSWORD}@db.internal:5432/campaignd{query}"

    settings = load_settings(_write(tmp_path, f'[database]\nurl = "{url}"\n'))

    assert settings.database.url.get_secret_value() == url


def test_a_missing_root_certificate_named_by_pgsslrootcert_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncpg raised FileNotFoundError at every connection, an OSError: retried forever.
    monkeypatch.setenv("PGSSLROOTCERT", "/nonexistent/root.crt")
    url = f"postgresql://campaignd:{DB_PASSWORD}@db.internal:5432/campaignd?sslmode=verify-full"

    message = _load_error(tmp_path, f'[database]\nurl = "{url}"\n')

    assert (
        "database.url: Value error, parameter sslrootcert (or PGSSLROOTCERT) must name a readable file"
        in message
    )


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{DB_PASSWORD}@/db?host=h&port=abc",
        f"postgresql://u:{DB_PASSWORD}@/db?host=h1,h2&port=1,2,3",
        f"postgresql://u:{DB_PASSWORD}@/db?host=h1,,h2",
        f"postgresql://u:{DB_PASSWORD}@h1,,h2/db",
    ],
)
def test_a_database_host_list_the_client_would_crash_on_is_refused(tmp_path: Path, url: str) -> None:
    # ValueError, IndexError or ClientConfigurationError from asyncpg at connect, with a traceback.
    message = _load_error(tmp_path, f'[database]\nurl = "{url}"\n')

    assert "database.url: Value error" in message
    assert DB_PASSWORD not in message


def test_a_section_variable_that_is_not_json_is_named_as_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMPAIGND_SENDERS__SMS__URL", "https://sms.example.com/send")
    monkeypatch.setenv("CAMPAIGND_SENDERS__SMS__HEADERS", f"notjson {HEADER_SECRET}")

    with pytest.raises(ConfigError) as caught:
        load_settings()

    message = str(caught.value)
    # Not "senders (from environment variable CAMPAIGND_SENDERS)", a variable nobody set.
    assert "senders.sms.headers (from environment variable CAMPAIGND_SENDERS__SMS__HEADERS)" in message
    assert "CAMPAIGND_SENDERS)" not in message
    assert HEADER_SECRET not in message


def test_an_upper_case_sender_id_is_overridden_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Variable names arrive lower-cased: the override used to make a second sender "sms_eu"
    # (and fail, "senders.sms_eu.url: Field required") instead of changing SMS_EU.
    monkeypatch.setenv("CAMPAIGND_SENDERS__SMS_EU__RATE_PER_SECOND", "3.5")
    text = '[senders.SMS_EU]\nurl = "https://sms.example.com/send"\nburst = 4\n'

    settings = load_settings(_write(tmp_path, text))

    assert list(settings.senders) == ["SMS_EU"]
    assert (settings.senders["SMS_EU"].rate_per_second, settings.senders["SMS_EU"].burst) == (3.5, 4)


def test_an_override_of_senders_whose_ids_differ_only_in_case_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAMPAIGND_SENDERS__SMS__BURST", "2")
    text = '[senders.sms]\nurl = "https://a.example/send"\n[senders.SMS]\nurl = "https://b.example/send"\n'

    message = _load_error(tmp_path, text)

    assert "'SMS' and 'sms' differ only in case" in message


def test_a_header_override_replaces_the_file_header_whatever_its_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HTTP header names are case-insensitive: both X-Api-Key and x-api-key used to be sent.
    monkeypatch.setenv("CAMPAIGND_SENDERS__SMS__HEADERS__X-API-KEY", "override")
    path = _write(tmp_path, _sender_config('headers = { X-Api-Key = "file", X-Tenant = "acme" }'))

    headers = load_settings(path).senders["sms"].headers

    assert {name: value.get_secret_value() for name, value in headers.items()} == {
        "X-Api-Key": "override",
        "X-Tenant": "acme",
    }


def test_the_same_header_in_two_cases_is_refused(tmp_path: Path) -> None:
    message = _load_error(tmp_path, _sender_config('headers = { X-Api-Key = "a", x-api-key = "b" }'))

    assert "senders.sms.headers" in message and "case-insensitive" in message


def test_a_sender_that_is_not_a_table_is_named_as_such(tmp_path: Path) -> None:
    message = _load_error(tmp_path, "[senders]\nsms = 5\n")

    assert "senders.sms: must be a table" in message
    assert "provider" not in message


# ----------------------------------------------------------------- secrets


def test_settings_str_and_repr_hide_secrets(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, VALID))

    for text in (str(settings), repr(settings), str(settings.senders["sms"]), repr(settings.database)):
        assert HEADER_SECRET not in text
        assert DB_PASSWORD not in text
    # Not blank either: the non-secret parts are still there to read.
    assert "sms.example.com" in repr(settings)


def test_settings_json_dump_hides_secrets(tmp_path: Path) -> None:
    dumped = load_settings(_write(tmp_path, VALID)).model_dump_json()

    assert HEADER_SECRET not in dumped
    assert DB_PASSWORD not in dumped


def test_config_error_does_not_quote_secret_values(tmp_path: Path) -> None:
    text = VALID.replace("burst = 5", "burst = 0").replace("pool_size = 4", "pool_size = 'x'")

    message = _load_error(tmp_path, text)

    assert "senders.sms.burst" in message
    assert HEADER_SECRET not in message
    assert DB_PASSWORD not in message


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, VALID))

    with pytest.raises(ValueError):
        settings.dispatch.concurrency = 1
    assert isinstance(settings, Settings)


# ----------------------------------------------------------------- CLI


@pytest.fixture
def cli_env() -> Iterator[dict[str, str]]:
    yield {name: value for name, value in os.environ.items() if not name.upper().startswith("CAMPAIGND_")}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "campaignd", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", ["run", "migrate"])
def test_cli_bad_config_exits_2_naming_the_field(
    tmp_path: Path, cli_env: dict[str, str], command: str
) -> None:
    path = _write(tmp_path, VALID.replace("concurrency = 16", "concurrency = 0"))

    done = _cli(cli_env, command, "--config", str(path))

    assert done.returncode == 2, done.stderr
    assert "dispatch.concurrency" in done.stderr
    assert HEADER_SECRET not in done.stderr + done.stdout
    assert DB_PASSWORD not in done.stderr + done.stdout


@pytest.mark.parametrize("command", ["migrate", "status"])
def test_cli_unreadable_database_url_exits_2_without_the_password(
    tmp_path: Path, cli_env: dict[str, str], command: str
) -> None:
    path = _write(tmp_path, VALID.replace(f":{DB_PASSWORD}@", f":{DB_PASSWORD}/x@"))

    done = _cli(cli_env, command, "--config", str(path))

    assert done.returncode == 2, done.stderr
    assert "database.url" in done.stderr and "Traceback" not in done.stderr
    assert DB_PASSWORD not in done.stderr + done.stdout


@pytest.mark.parametrize("command", ["senders", "migrate"])
def test_cli_database_url_with_a_parameter_the_client_refuses_exits_2(
    cli_env: dict[str, str], command: str
) -> None:
    # It used to exit 1, "cannot connect" / "unreachable", and `run` retried forever.
    cli_env["CAMPAIGND_DATABASE__URL"] = f"postgresql://u:{DB_PASSWORD}@127.0.0.1:1/db?sslmode=bogus"

    done = _cli(cli_env, command)

    assert done.returncode == 2, done.stderr
    assert "database.url: Value error, parameter sslmode must be one of" in done.stderr
    assert "Traceback" not in done.stderr
    assert DB_PASSWORD not in done.stderr + done.stdout


@pytest.mark.parametrize("command", ["migrate", "senders"])
def test_cli_connection_setting_the_client_refuses_at_connect_exits_2(
    cli_env: dict[str, str], command: str
) -> None:
    # What settings cannot see (here a PG* variable) surfaces as ClientConfigurationError at
    # the first connection: a configuration error, not the database being unreachable (which
    # the operator commands said, exit 1).
    cli_env["PGSSLMODE"] = "bogus"
    cli_env["CAMPAIGND_DATABASE__URL"] = f"postgresql://u:{DB_PASSWORD}@127.0.0.1:1/db"

    done = _cli(cli_env, command)

    assert done.returncode == 2, done.stderr
    assert "database.url: the PostgreSQL client refuses it" in done.stderr
    assert "Traceback" not in done.stderr
    assert DB_PASSWORD not in done.stderr + done.stdout


@pytest.mark.parametrize("refusal", ["NOLOGIN", "no such database"])
@pytest.mark.parametrize("command", ["run", "senders"])
async def test_cli_a_login_the_database_refuses_exits_1_with_its_reason(
    tmp_path: Path,
    cli_env: dict[str, str],
    database_url: str,
    conn: asyncpg.Connection,
    command: str,
    refusal: str,
) -> None:
    # `run` ended in a 60-line traceback; the operator commands said this.
    role = f"refused_{os.getpid()}"
    await conn.execute(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} NOLOGIN PASSWORD '{DB_PASSWORD}'")
    try:
        parts = urlsplit(database_url)
        netloc = f"{role}:{DB_PASSWORD}@{parts.netloc.rpartition('@')[2]}"
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        if refusal == "no such database":
            url = with_database(database_url, "no_such_database")
        path = _write(
            tmp_path, f'[database]\nurl = "{url}"\n[senders.sms]\nurl = "http://127.0.0.1:1/send"\n'
        )

        done = await asyncio.to_thread(_cli, cli_env, command, "--config", str(path))
    finally:
        await conn.execute(f"DROP ROLE {role}")

    assert done.returncode == 1, done.stderr
    assert "campaignd: cannot connect to the database: Invalid" in done.stderr
    assert "Traceback" not in done.stderr
    assert DB_PASSWORD not in done.stderr + done.stdout


def test_cli_unreadable_toml_exits_2(tmp_path: Path, cli_env: dict[str, str]) -> None:
    path = _write(tmp_path, "not = [valid\n", "broken.toml")

    done = _cli(cli_env, "migrate", "--config", str(path))

    assert done.returncode == 2
    assert str(path) in done.stderr


def test_cli_run_without_senders_exits_2(tmp_path: Path, cli_env: dict[str, str]) -> None:
    path = _write(tmp_path, "[dispatch]\nconcurrency = 3\n")

    done = _cli(cli_env, "run", "--config", str(path))

    assert done.returncode == 2
    assert "senders" in done.stderr


def test_cli_help_lists_the_commands(cli_env: dict[str, str]) -> None:
    done = _cli(cli_env, "--help")

    assert done.returncode == 0
    for command in ("run", "migrate", "status", "demo"):
        assert command in done.stdout


def test_cli_unknown_subcommand_exits_2(cli_env: dict[str, str]) -> None:
    done = _cli(cli_env, "frobnicate")

    assert done.returncode == 2
    assert "usage:" in done.stderr
    assert "frobnicate" in done.stderr


@pytest.mark.parametrize(
    "args", [[], ["run", "--no-such-flag"], ["status", "not-a-uuid"], ["demo", "--rate", "x"]]
)
def test_cli_usage_error_exits_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(args)

    assert caught.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_config_after_subcommand_is_used() -> None:
    args = build_parser().parse_args(["run", "--config", "x.toml", "--log-level", "error"])

    assert args.config == Path("x.toml")
    assert args.log_level == "error"


def test_cli_config_before_subcommand_is_used() -> None:
    args = build_parser().parse_args(["--config", "x.toml", "--log-level", "error", "run"])

    assert args.config == Path("x.toml")
    assert args.log_level == "error"
