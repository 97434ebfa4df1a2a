"""Creating and upgrading the ``campaignd`` schema."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from campaignd.sql import MIGRATIONS, QUERIES, SCHEMA_VERSION

if TYPE_CHECKING:
    from campaignd.db import Connection

log = structlog.get_logger("campaignd.schema")


async def migrate(connection: Connection) -> list[int]:
    """Apply the migrations this database lacks; returns the versions applied.

    Idempotent and safe to run from several processes at once (``ExecStartPre`` on every
    host): each runs under one advisory lock, in one transaction, so a migrator that dies
    half-way leaves nothing applied.
    """
    async with connection.transaction():
        await connection.execute(QUERIES["migrations_lock"])
        await connection.execute(QUERIES["migrations_bootstrap"])
        applied = {row["version"] for row in await connection.fetch(QUERIES["migrations_applied"])}
        newly_applied = []
        for migration in MIGRATIONS:
            if migration.version in applied:
                continue
            await connection.execute(migration.sql)
            await connection.execute(QUERIES["migrations_record"], migration.version, migration.name)
            newly_applied.append(migration.version)
            log.info("migration_applied", version=migration.version, name=migration.name)
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
