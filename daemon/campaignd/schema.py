"""Creating and upgrading the ``campaignd`` schema."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import asyncpg
import structlog

from campaignd.db import Backoff
from campaignd.sql import MIGRATIONS, QUERIES, SCHEMA_VERSION, Migration

if TYPE_CHECKING:
    from campaignd.db import Connection

log = structlog.get_logger("campaignd.schema")

# A migration that alters a table waits for its lock at the head of that table's lock queue,
# and every read and write of the table (the daemons' claims, a host's inserts) queues behind
# it. Under the session's lock_timeout (5 s by default) they all stalled that long, then the
# migration failed. It waits this long per try instead, then lets them through and tries again.
MIGRATION_LOCK_TIMEOUT_SECONDS: Final = 0.5
# How long the tries go on before `campaignd migrate` gives up: below the unit's
# TimeoutStartSec (90 s, which covers the daemon's start too), so that the failure is reported
# in words rather than the process killed.
MIGRATION_LOCK_WAIT_SECONDS: Final = 60.0
# The first pause between tries, doubling to the cap, with jitter (Backoff): migrators on
# several hosts do not knock at the same instant, and readers get the table between tries.
MIGRATION_BACKOFF_FIRST_SECONDS: Final = 0.2
MIGRATION_BACKOFF_CAP_SECONDS: Final = 5.0

# Either means the lock was not taken and the transaction rolled back: nothing was applied,
# and the whole migration can run again.
_LOCK_CONFLICTS: Final = (
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.DeadlockDetectedError,
)


class MigrationLockTimeout(Exception):
    """A migration could not take a lock it needs in time; nothing was applied."""


@dataclass(frozen=True)
class _Step:
    """What a migration transaction is doing, so that a lock it waits for can be named."""

    waiting_for: str
    version: int | None = None
    name: str | None = None


_MIGRATION_LOCK_STEP: Final = _Step("the migration lock")
_BOOTSTRAP_STEP: Final = _Step("campaignd.schema_migrations")


def _migration_step(migration: Migration) -> _Step:
    return _Step(
        f"the tables migration {migration.version} ({migration.name}) changes",
        migration.version,
        migration.name,
    )


class _LockBusy(Exception):
    def __init__(self, step: _Step, schema_version: int | None) -> None:
        super().__init__(step.waiting_for)
        self.step = step
        self.schema_version = schema_version


def lock_timeout_setting(seconds: float) -> str:
    # Never "0ms", which PostgreSQL reads as "no timeout".
    return f"{max(1, round(seconds * 1000))}ms"


def may_wait(now: float, delay: float, deadline: float) -> bool:
    """Whether another try after ``delay`` still starts before the deadline."""
    return now + delay < deadline


def gave_up_message(step: _Step, schema_version: int | None, seconds: float, tries: int) -> str:
    within = f"within {seconds:g} s ({tries} {'try' if tries == 1 else 'tries'})"
    if step is _MIGRATION_LOCK_STEP:
        what = f"could not take the migration lock {within}: another `campaignd migrate` holds it"
    elif step.version is None:
        what = f"could not take a lock on {step.waiting_for} {within}: another transaction holds it"
    else:
        what = (
            f"could not take a lock for migration {step.version} ({step.name}) {within}: another "
            "transaction holds a table it changes (see pg_locks and pg_stat_activity)"
        )
    if step.version is None:
        state = "nothing was applied"
    elif schema_version is None:
        state = "nothing was applied, there is no campaignd schema yet"
    else:
        state = f"nothing was applied, the schema is still at version {schema_version}"
    return f"{what}; {state}. Run `campaignd migrate` again once that transaction has ended."


async def migrate(
    connection: Connection,
    *,
    lock_timeout_seconds: float = MIGRATION_LOCK_TIMEOUT_SECONDS,
    give_up_after_seconds: float = MIGRATION_LOCK_WAIT_SECONDS,
    backoff: Backoff | None = None,
) -> list[int]:
    """Apply the migrations this database lacks; returns the versions applied.

    Idempotent and safe to run from several processes at once (``ExecStartPre`` on every
    host): each runs under one advisory lock, in one transaction, so a migrator that dies
    half-way leaves nothing applied. A lock a migration needs is waited for at most
    ``lock_timeout_seconds`` at a time; the whole transaction is tried again with ``backoff``
    until ``give_up_after_seconds``, then MigrationLockTimeout is raised, nothing applied.
    """
    backoff = backoff or Backoff(MIGRATION_BACKOFF_FIRST_SECONDS, MIGRATION_BACKOFF_CAP_SECONDS)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after_seconds
    attempt = 0
    while True:
        attempt += 1
        try:
            applied = await _migrate_once(connection, lock_timeout_seconds)
        except _LockBusy as busy:
            delay = backoff.next()
            if not may_wait(loop.time(), delay, deadline):
                raise MigrationLockTimeout(
                    gave_up_message(busy.step, busy.schema_version, give_up_after_seconds, attempt)
                ) from busy.__cause__
            log.warning(
                "migration_waiting_for_lock",
                version=busy.step.version,
                name=busy.step.name,
                waiting_for=busy.step.waiting_for,
                attempt=attempt,
                error=type(busy.__cause__).__name__,
                retry_in=round(delay, 2),
            )
            await asyncio.sleep(delay)
            continue
        # Only once committed: a try that rolled back applied nothing.
        for migration in applied:
            log.info("migration_applied", version=migration.version, name=migration.name)
        return [migration.version for migration in applied]


async def _migrate_once(connection: Connection, lock_timeout_seconds: float) -> list[Migration]:
    step = _MIGRATION_LOCK_STEP
    schema_version: int | None = None
    try:
        async with connection.transaction():
            # Waiting for another migrator blocks no table: that wait keeps the session's timeout.
            await connection.execute(QUERIES["migrations_lock"])
            await connection.fetchval(
                QUERIES["migrations_lock_timeout"], lock_timeout_setting(lock_timeout_seconds)
            )
            step = _BOOTSTRAP_STEP
            await connection.execute(QUERIES["migrations_bootstrap"])
            applied = {row["version"] for row in await connection.fetch(QUERIES["migrations_applied"])}
            schema_version = max(applied, default=None)
            newly_applied: list[Migration] = []
            for migration in MIGRATIONS:
                if migration.version in applied:
                    continue
                step = _migration_step(migration)
                await connection.execute(migration.sql)
                await connection.execute(QUERIES["migrations_record"], migration.version, migration.name)
                newly_applied.append(migration)
    except _LOCK_CONFLICTS as exc:
        raise _LockBusy(step, schema_version) from exc
    return newly_applied


async def current_version(connection: Connection) -> int | None:
    # Two statements: one naming a table that does not exist fails at planning, CASE or not.
    if not await connection.fetchval(QUERIES["schema_exists"]):
        return None
    version: int | None = await connection.fetchval(QUERIES["schema_version"])
    return version


class SchemaNotReady(Exception):
    """The database's schema is not the one this build expects."""


async def require_current(connection: Connection) -> None:
    version = await current_version(connection)
    if version is None:
        raise SchemaNotReady("the campaignd schema does not exist: run `campaignd migrate` first")
    if version < SCHEMA_VERSION:
        raise SchemaNotReady(
            f"the campaignd schema is at version {version}, this build needs {SCHEMA_VERSION}: "
            "run `campaignd migrate`"
        )
    if version > SCHEMA_VERSION:
        raise SchemaNotReady(
            f"the campaignd schema is at version {version}, newer than this build ({SCHEMA_VERSION}): "
            "upgrade campaignd"
        )
