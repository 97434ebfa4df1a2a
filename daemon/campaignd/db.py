"""Connections to PostgreSQL: session guards, JSON codecs, and telling outages from bugs."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg
import orjson
import structlog

from campaignd import metrics
from campaignd.asyncutil import wait_any
from campaignd.config import DatabaseConfig
from campaignd.redact import Redactor
from campaignd.render import UnreadableJson

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # A connection of its own or one borrowed from the pool: the queries take either.
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

log = structlog.get_logger("campaignd.db")

T = TypeVar("T")

LOGIN_REFUSED = asyncpg.exceptions.InvalidAuthorizationSpecificationError

# Errors that mean "the database is unreachable, restarting or overloaded right now":
# the daemon waits and retries them. Anything else is a bug and is raised.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout
    asyncpg.exceptions.DeadlockDetectedError,
    # A failover that points the daemon at a standby not yet promoted: writes are refused
    # until it is. Exiting instead put every host in a restart loop and left claims in doubt.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.SerializationError,
    # A pooled connection the server dropped while asyncpg was still consuming its error
    # ("cannot switch to state 12; another operation (2) is in progress"), seen when a daemon
    # thawed from SIGSTOP just as the server shut down. The pool terminates such a connection
    # on release, so a retry gets a new one; raising it killed the daemon mid-outage.
    asyncpg.exceptions.InternalClientError,
    # A login the server refuses once the daemon runs (a password rotated in the database
    # before the configuration, NOLOGIN, pg_hba.conf), met when the pool opens a new
    # connection. Raised, it crashed the lanes, cut off the requests in the air and lost
    # the outcomes held to write: a sender that cannot resend then failed, in doubt,
    # recipients never sent. Waited out like an outage, the outcomes are written once the
    # login works again. At start it is the operator's to fix (create_pool's callers).
    LOGIN_REFUSED,
)


def is_transient_db_error(exc: BaseException) -> bool:
    # A ClientConfigurationError is an InterfaceError, but it is the URL's (or a PG*
    # variable's) fault: a bad sslmode, a missing root certificate. Retried, it kept the
    # daemon "waiting for the database" forever, where exit code 2 lets systemd stop.
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        return False
    return isinstance(exc, TRANSIENT_DB_ERRORS)


def client_configuration_problem(exc: BaseException, config: DatabaseConfig) -> str | None:
    """What the client refused in the connection settings, if that is what ``exc`` is.

    Settings validation catches a bad URL parameter; this is what only the client can see
    (a PG* environment variable, a root certificate file that is missing). asyncpg's message
    names the parameter and the value it got, and the URL's password is masked all the same.
    """
    if not isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        return None
    return url_redactor(config)(f"the PostgreSQL client refuses it: {exc}")


def url_redactor(config: DatabaseConfig) -> Redactor:
    """Masks the database URL and its password (as written and decoded) in a driver's message."""
    url = config.url.get_secret_value()
    try:
        password = urlsplit(url).password or ""
    except ValueError:
        password = ""
    return Redactor([url, password, unquote(password)])


def note_unavailable(
    logger: structlog.typing.FilteringBoundLogger, during: str, exc: BaseException, **fields: object
) -> None:
    """One log line and one metric per failed database operation that will be retried."""
    metrics.DATABASE_ERRORS.labels(during).inc()
    if isinstance(exc, LOGIN_REFUSED):
        # The server's words say what to fix ("password authentication failed for user ...",
        # "role ... is not permitted to log in"); they never quote a password.
        fields["message"] = str(exc)
    logger.warning("database_unavailable", during=during, error=type(exc).__name__, **fields)


def session_settings(config: DatabaseConfig) -> dict[str, str]:
    # Guards so that a stuck query or a client that died mid-transaction cannot hold locks
    # that every other daemon then waits on.
    return {
        "application_name": "campaignd",
        # The batch statements join parameter arrays (unnest) to tables. A generic plan for a
        # prepared statement cannot know an array's length, and after an ANALYZE it may pick a
        # nested loop that rescans the array per row: measured 563 ms instead of 13 ms per
        # 1,000 outcomes (bench/record_outcomes_plan.py). Planning each execution costs far less.
        "plan_cache_mode": "force_custom_plan",
        # campaignd's SQL writes backslashes as themselves (the regexes of address_key, which
        # is inlined into the statements that call it and so parsed in the caller's session).
        # A database or role still set to the pre-9.1 default would read them as escapes: the
        # migration succeeded, and every call then failed, crashing the sender's lane.
        "standard_conforming_strings": "on",
        "statement_timeout": _milliseconds(config.statement_timeout_seconds),
        "lock_timeout": _milliseconds(config.lock_timeout_seconds),
        "idle_in_transaction_session_timeout": _milliseconds(config.idle_in_transaction_timeout_seconds),
    }


def _milliseconds(seconds: float) -> str:
    # Never "0", which PostgreSQL reads as "no timeout".
    return str(max(1, round(seconds * 1000)))


def _encode_jsonb(value: object) -> bytes:
    # jsonb's binary wire format is a version byte (1) followed by the JSON text; binary
    # codecs let COPY (bulk recipient loads) carry jsonb columns too.
    return b"\x01" + orjson.dumps(value)


def _decode_json(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return UnreadableJson(str(exc))


def _decode_jsonb(data: bytes) -> object:
    return _decode_json(data[1:])


async def _init_connection(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    await connection.set_type_codec(
        "jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog", format="binary"
    )
    await connection.set_type_codec(
        "json", encoder=orjson.dumps, decoder=_decode_json, schema="pg_catalog", format="binary"
    )


async def connect(config: DatabaseConfig) -> asyncpg.Connection:
    connection: asyncpg.Connection = await asyncpg.connect(
        config.url.get_secret_value(), server_settings=session_settings(config), timeout=10
    )
    try:
        await _init_connection(connection)
    except BaseException:
        # Cut off (a caller's timeout, a server gone silent) before the caller holds it.
        connection.terminate()
        raise
    return connection


# How much longer than the server's statement_timeout the daemon waits for an answer before
# giving a connection up: time for the server's own cancel, and the rows, to arrive.
ANSWER_MARGIN_SECONDS = 5.0


# What answer_timeout gives where the server has no statement_timeout (0): a session whose
# startup settings were not applied (a pooler that drops them), with no bound of its own.
UNBOUNDED_ANSWER_SECONDS = 86_400.0


def answer_timeout(statement_timeout_seconds: float) -> float:
    """How long the daemon waits for the answer to a statement that runs under
    ``statement_timeout_seconds`` on the server (0: none)."""
    if statement_timeout_seconds <= 0:
        return UNBOUNDED_ANSWER_SECONDS
    return statement_timeout_seconds + ANSWER_MARGIN_SECONDS


# Seconds a pool connection may sit unused before it is closed: a failover must not leave the
# pool full of sockets to the old primary. The watchdog relies on it too (watchdog.py).
MAX_INACTIVE_CONNECTION_SECONDS = 60.0


async def create_pool(config: DatabaseConfig) -> asyncpg.Pool:
    """The daemon's connections. Every statement on them waits for its answer at most
    answer_timeout() (a statement that needs longer passes its own timeout): a connection to a
    server that stopped answering without closing it (a partition, a failover that moved the
    server's address) is then cancelled and closed, and the caller's retry takes a new one.
    Waited on, it held a lane's claims and outcomes, and its campaign in SENDING, until the
    kernel gave the socket up (~15 minutes), or for good where nothing ever did."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        config.url.get_secret_value(),
        min_size=1,
        max_size=config.pool_size,
        server_settings=session_settings(config),
        init=_init_connection,
        timeout=10,
        command_timeout=answer_timeout(config.statement_timeout_seconds),
        max_inactive_connection_lifetime=MAX_INACTIVE_CONNECTION_SECONDS,
    )
    return pool


async def close_pool(pool: asyncpg.Pool, seconds: float) -> None:
    """Closes the pool's connections politely where the server answers, within ``seconds``.

    A polite close waits for the server's goodbye, which a connection gone silent (a
    partition, a failover) never gets: a daemon stopped after one waited until its stop
    overran its budget and exited 1, its work all done. Past ``seconds`` the rest is dropped.
    """
    try:
        async with asyncio.timeout(seconds):
            await pool.close()
    except TimeoutError:
        # Interrupted, asyncpg's close terminates what is left; said here too, for the reader.
        pool.terminate()
        log.warning("pool_close_timed_out", seconds=seconds, note="connections dropped")


class Backoff:
    """Delays for reconnecting: 0.2 s doubling to a cap, with jitter so that many daemons
    coming back after a database restart do not knock at the same instant."""

    def __init__(self, first: float = 0.2, cap: float = 10.0) -> None:
        self._first = first
        self._cap = cap
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self._cap, self._next * 2)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._next = self._first

    async def wait_after(
        self,
        exc: Exception,
        logger: structlog.typing.FilteringBoundLogger,
        during: str,
        *interrupts: asyncio.Event,
        **fields: object,
    ) -> None:
        """After a failed database operation: re-raise a bug, or log the outage and wait the
        next delay (cut short by any of ``interrupts``) before the caller retries."""
        if not is_transient_db_error(exc):
            raise exc
        delay = self.next()
        note_unavailable(logger, during, exc, retry_in=round(delay, 2), **fields)
        await wait_any(*interrupts, seconds=delay)


async def retry_until(
    operation: Callable[[], Awaitable[T]],
    *,
    stop: asyncio.Event,
    what: str,
    fatal: tuple[type[Exception], ...] = (),
    **log_fields: object,
) -> T | None:
    """Run ``operation`` until it succeeds despite database outages; None if ``stop`` is set
    first. ``fatal`` errors are raised even if transient once running (LOGIN_REFUSED at start)."""
    backoff = Backoff()
    while not stop.is_set():
        try:
            return await operation()
        except fatal:
            raise
        except Exception as exc:
            await backoff.wait_after(exc, log, what, stop, **log_fields)
    return None
