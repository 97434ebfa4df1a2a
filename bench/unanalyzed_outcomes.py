"""A lane's outcome writes in a recipients table never analyzed (a new installation's first campaigns).

    python bench/unanalyzed_outcomes.py [--recipients 200000,1000000] [--batches 20]

No daemon and no HTTP. Per size, a fresh database (migrated, autovacuum off for the recipients
table, so it stays without statistics), one SENDING campaign of N recipients inserted by one
INSERT ... SELECT (as from a host's staging table; loaded with COPY, as bench/_common's
campaigns are, the planner's guess for such a table came out differently and kept the hash
join at 1M), a lane held; then, as a lane does, batches of 1,000 claimed and written, the
next batch claimed before the last is written. Two ways, batch by batch in turn:

- lane: ``dispatch.record_outcomes``, what the daemon runs (its own transaction, planned
  without nested loops);
- plain: the statement alone, planned as the server likes. Before 6dd624b, when the
  statement still joined its way to the rows, that plan read the batch again for each claim
  from some 500,000 rows (250 ms a batch at 1M); the statement finding its rows by key no
  longer did in these runs, and the setting stays as a guard against the planner's guesses.

Prints the median, min and max milliseconds per batch of each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from _common import bench_workdir, create_campaign, embedded_postgres, int_list, with_database
from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.dispatch import record_outcomes
from campaignd.outcomes import RecipientState, RecipientUpdate, outcome_columns
from campaignd.schema import migrate
from campaignd.sql import QUERIES

BATCH = 1000


async def run_size(url: str, size: int, batches: int) -> None:
    name = f"unanalyzed_{size}"
    admin = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {name}")
    connection = await db.connect(DatabaseConfig(url=with_database(url, name)))  # type: ignore[arg-type]
    try:
        await connection.execute("SET statement_timeout = 0")
        await migrate(connection)
        await connection.execute("ALTER TABLE campaignd.recipients SET (autovacuum_enabled = false)")
        campaign_id = await create_campaign(connection, 0)
        await connection.execute(
            "INSERT INTO campaignd.recipients (campaign_id, address, variables)"
            " SELECT $1, '+1555' || lpad(g::text, 7, '0'), jsonb_build_object('name', 'n' || g)"
            " FROM generate_series(1, $2::integer) g",
            campaign_id,
            size,
        )
        await connection.execute(
            "UPDATE campaignd.campaigns SET status = 'sending', prepared_at = now(), started_at = now(),"
            " total_count = $2 WHERE id = $1",
            campaign_id,
            size,
        )
        epoch = await connection.fetchval(
            "UPDATE campaignd.senders SET lease_owner = 'bench', lease_epoch = lease_epoch + 1,"
            " lease_expires_at = now() + interval '1 hour' RETURNING lease_epoch"
        )
        statistics_known = await connection.fetchval(
            "SELECT reltuples FROM pg_class WHERE oid = 'campaignd.recipients'::regclass"
        )
        assert statistics_known <= 0, "the recipients table has statistics"
        lane = ("bench", "bench", epoch)
        cursor = claim_number = 0

        async def claim() -> list[int]:
            nonlocal cursor, claim_number
            claim_number += 1
            rows = await connection.fetch(
                QUERIES["claim_recipients"], *lane, campaign_id, cursor, BATCH, 600.0, claim_number
            )
            ids = sorted(row["id"] for row in rows)
            cursor = ids[-1]
            return ids

        took: dict[str, list[float]] = {"lane": [], "plain": []}
        current = await claim()
        for index in range(batches):
            following = await claim()
            columns = outcome_columns(
                [RecipientUpdate(i, RecipientState.SENT, provider_message_id="x") for i in current]
            )
            way = "lane" if index % 2 == 0 else "plain"
            started = time.perf_counter()
            if way == "lane":
                row = await record_outcomes(connection, lane, columns)
            else:
                row = await connection.fetchrow(QUERIES["record_outcomes"], *lane, *columns)
            took[way].append(1000 * (time.perf_counter() - started))
            assert row is not None and row["applied"] == len(current), row
            current = following
        for way, times in took.items():
            print(
                f"{size:>10,} {way:>6}: median {statistics.median(times):7.1f} ms per batch of {BATCH}"
                f" (min {min(times):.1f}, max {max(times):.1f}, {len(times)} batches)",
                flush=True,
            )
    finally:
        await connection.close()
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int_list, default=[200_000, 1_000_000])
    parser.add_argument("--batches", type=int, default=20, help="timed batches per size, both ways (20)")
    args = parser.parse_args()

    async def run(url: str) -> None:
        for size in args.recipients:
            await run_size(url, size, args.batches)

    with bench_workdir("campaignd-unanalyzed-", keep=False) as work, embedded_postgres(work) as postgres:
        asyncio.run(run(postgres.url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
