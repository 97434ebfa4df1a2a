"""``record_outcomes`` before and after the recipients table is analyzed mid-campaign.

    python bench/record_outcomes_plan.py [--recipients N] [--batch B] [--analyses K]

No daemon and no HTTP: the statements a lane runs on an embedded PostgreSQL, recording
batch after batch with the next batch already claimed, timed through asyncpg's cached
prepared statement (generic after five executions, as in the daemon). Then K times:
``ANALYZE campaignd.recipients`` with a batch in flight (what autovacuum does once enough
rows changed), EXPLAIN ANALYZE of the statement's generic and custom plans inside a
rolled-back transaction, and two more timed batches. ANALYZE samples rows at random, so
the generic plan differs from one ANALYZE to the next; the slowest is printed beside the
custom plan of the same moment. Stops by itself in well under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
from collections.abc import Sequence

import asyncpg

from _common import (
    clone_database,
    create_campaign,
    create_template,
    embedded_postgres,
    new_workdir,
)
from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.dispatch import record_outcomes
from campaignd.logs import configure_logging
from campaignd.outcomes import OutcomeColumns, RecipientState, RecipientUpdate, outcome_columns
from campaignd.schema import migrate
from campaignd.sql import QUERIES

OWNER, EPOCH = "bench-owner", 1
CLAIM = (
    "UPDATE campaignd.recipients SET state = 'in_flight', attempts = attempts + 1,"
    " lease_owner = $2, lease_epoch = $3, lease_expires_at = now() + interval '1 hour', updated_at = now()"
    " WHERE id = ANY($1::bigint[])"
)
# What to keep of a plan: the joins and scans, and how much work they did.
PLAN_MARKERS = ("Join", "Nested Loop", "Scan", "Rows Removed", "Execution Time")


def outcome_columns_of(ids: Sequence[int]) -> OutcomeColumns:
    """record_outcomes' arrays, as a lane makes them: every claim sent, with a provider
    message id."""
    return outcome_columns([RecipientUpdate(i, RecipientState.SENT, provider_message_id="x") for i in ids])


def array_literal(values: Sequence[object], cast: str) -> str:
    return "'{" + ",".join(str(value) for value in values) + "}'::" + cast


async def batches(
    connection: asyncpg.Connection, ids: list[int], first: int, count: int, batch: int, *, claim_first: bool
) -> None:
    """Record batch after batch, each claimed one batch ahead; the batch after the last is left
    claimed (in flight), as a running lane always has claims in the air."""
    for index in range(first, first + count):
        chunk = ids[index * batch : (index + 1) * batch]
        if index == first and claim_first:
            await connection.execute(CLAIM, chunk, OWNER, EPOCH)
        await connection.execute(CLAIM, ids[(index + 1) * batch : (index + 2) * batch], OWNER, EPOCH)
        started = time.perf_counter()
        # As the lane writes them: in a transaction planned without nested loops.
        await record_outcomes(connection, ("bench", OWNER, EPOCH), outcome_columns_of(chunk))
        took = 1000 * (time.perf_counter() - started)
        print(f"  batch {index:3d}: record_outcomes of {len(chunk)} took {took:6.0f} ms")


async def explain(connection: asyncpg.Connection, chunk: list[int], mode: str) -> list[str]:
    """EXPLAIN ANALYZE of record_outcomes for claimed rows, rolled back so they stay claimed."""
    # A fresh SQL-level prepared statement each time: it is planned with the statistics of now.
    if await connection.fetchval(
        "SELECT count(*) FROM pg_prepared_statements WHERE name = 'record_outcomes_plan'"
    ):
        await connection.execute("DEALLOCATE record_outcomes_plan")
    await connection.execute(
        "PREPARE record_outcomes_plan (text, text, bigint, bigint[], text[], text[], text[], text[],"
        " float8[], int[], bigint[], boolean[]) AS " + QUERIES["record_outcomes"]
    )
    count = len(chunk)
    call = (
        f"EXECUTE record_outcomes_plan ('bench', '{OWNER}', {EPOCH}, {array_literal(chunk, 'bigint[]')},"
        f" {array_literal(['sent'] * count, 'text[]')}, {array_literal(['x'] * count, 'text[]')},"
        f" {array_literal(['NULL'] * count, 'text[]')}, {array_literal(['NULL'] * count, 'text[]')},"
        f" {array_literal([0] * count, 'float8[]')}, {array_literal([0] * count, 'int[]')}, NULL, NULL)"
    )
    # In the transaction the lane writes outcomes in (record_outcomes_begin), rolled back.
    await connection.execute(QUERIES["record_outcomes_begin"])
    try:
        await connection.execute(f"SET LOCAL plan_cache_mode = {mode}")
        rows = await connection.fetch("EXPLAIN (ANALYZE, TIMING OFF, COSTS OFF) " + call)
    finally:
        await connection.execute(QUERIES["record_outcomes_rollback"])
    return [row[0] for row in rows]


def execution_ms(plan: list[str]) -> float:
    line = next(line for line in plan if "Execution Time" in line)
    return float(line.split(":")[1].split()[0])


def print_plan(title: str, plan: list[str]) -> None:
    print(f"\n  {title}:")
    for line in plan:
        if any(marker in line for marker in PLAN_MARKERS):
            print("    " + line[:150])


async def main_async(url: str, recipients: int, batch: int, cycles: int) -> None:
    configure_logging("console", "warning")
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    try:
        await migrate(connection)
        await create_campaign(connection, recipients)
        await connection.execute("ANALYZE campaignd.recipients")
        # The lane's fence: record_outcomes applies only while the sender's lease is this one.
        await connection.execute(
            "UPDATE campaignd.senders SET lease_owner = $1, lease_epoch = $2,"
            " lease_expires_at = now() + interval '1 hour'",
            OWNER,
            EPOCH,
        )
        await connection.execute("UPDATE campaignd.campaigns SET status = 'sending', prepared_at = now()")
        ids = [row["id"] for row in await connection.fetch("SELECT id FROM campaignd.recipients ORDER BY id")]
        before = 6
        print(f"{recipients} recipients, batches of {batch}; statistics from before the first claim")
        await batches(connection, ids, 0, before, batch, claim_first=True)
        # ANALYZE samples rows at random, so the plan it leads to varies from one to the next:
        # several rounds show how often the generic plan goes wrong.
        worst: tuple[float, list[str], list[str]] | None = None
        position = before
        for analysis in range(1, cycles + 1):
            await connection.execute("ANALYZE campaignd.recipients")
            print(
                f"ANALYZE #{analysis} of campaignd.recipients with one batch in flight"
                " (what autovacuum does after enough changed rows)"
            )
            in_flight = ids[position * batch : (position + 1) * batch]
            generic = await explain(connection, in_flight, "force_generic_plan")
            custom = await explain(connection, in_flight, "force_custom_plan")
            print(
                f"  record_outcomes EXPLAIN ANALYZE: generic plan {execution_ms(generic):7.1f} ms,"
                f" custom plan {execution_ms(custom):7.1f} ms"
            )
            await batches(connection, ids, position, 2, batch, claim_first=False)
            position += 2
            if worst is None or execution_ms(generic) > worst[0]:
                worst = (execution_ms(generic), generic, custom)
        assert worst is not None
        print_plan("slowest generic plan", worst[1])
        print_plan("custom plan at the same moment", worst[2])
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=50_000)
    parser.add_argument(
        "--batch", type=int, default=1000, help="outcomes per statement, as [dispatch] batch_size"
    )
    parser.add_argument("--analyses", type=int, default=8, help="ANALYZE rounds, two batches apart (8)")
    args = parser.parse_args()
    if args.batch < 1 or args.analyses < 1 or args.recipients < (2 * args.analyses + 8) * args.batch:
        parser.error("--recipients must hold at least 2 x --analyses + 8 batches")
    workdir = new_workdir("campaignd-plan-")
    try:
        with embedded_postgres(workdir) as postgres:

            async def prepare() -> str:
                await create_template(postgres, "plan_template")
                return await clone_database(postgres, "plan_template", "plan")

            configure_logging("console", "warning")
            url = asyncio.run(prepare())
            asyncio.run(main_async(url, args.recipients, args.batch, args.analyses))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
