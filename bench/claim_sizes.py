"""How long one claim takes, by its size: what a lane's first claim makes its workers wait for.

    python bench/claim_sizes.py [--sizes 64,1000] [--rounds 16] [--recipients 200000]

A lane with no claim out first claims only what its workers can send at once
(``dispatch.claim_limit``), because every worker waits for that claim. This times
``claim_recipients`` (the daemon's own statement, autocommitted as the daemon runs it) for each
size in turn, ``--rounds`` times, on a prepared campaign of ``--recipients``, the sizes
alternating so that both see the same moments of a shared machine. Prints the median and
range per size, and the time of a one-row commit for scale. Embedded PostgreSQL at default
durability; the campaign is loaded with COPY, then ANALYZE and CHECKPOINT.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from _common import Postgres, bench_workdir, create_campaign, embedded_postgres, int_list
from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.schema import migrate
from campaignd.sql import QUERIES

OWNER, EPOCH, LEASE_SECONDS = "bench", 1, 60.0


async def main_async(postgres: Postgres, sizes: list[int], rounds: int, recipients: int) -> None:
    connection = await db.connect(DatabaseConfig(url=postgres.url))  # type: ignore[arg-type]
    try:
        await migrate(connection)
        campaign_id = await create_campaign(connection, recipients)
        sender_id = await connection.fetchval(
            "SELECT sender_id FROM campaignd.campaigns WHERE id = $1", campaign_id
        )
        # What a lane's start leaves behind: the campaign prepared and sending, the lane held.
        await connection.execute(
            "UPDATE campaignd.campaigns SET status = 'sending', prepared_at = now() WHERE id = $1",
            campaign_id,
        )
        await connection.execute(
            "UPDATE campaignd.senders SET lease_owner = $2, lease_epoch = $3,"
            " lease_expires_at = now() + interval '1 hour' WHERE id = $1",
            sender_id,
            OWNER,
            EPOCH,
        )
        await connection.execute("ANALYZE campaignd.recipients")
        await connection.execute("CHECKPOINT")
        if sum(sizes) * rounds > recipients:
            raise SystemExit(
                f"--recipients must be at least {sum(sizes) * rounds}: each claim takes fresh rows"
            )

        cursor = 0
        timings: dict[int, list[float]] = {size: [] for size in sizes}
        for _ in range(rounds):
            for size in sizes:
                started = time.perf_counter()
                rows = await connection.fetch(
                    QUERIES["claim_recipients"],
                    sender_id,
                    OWNER,
                    EPOCH,
                    campaign_id,
                    cursor,
                    size,
                    LEASE_SECONDS,
                    len(timings[size]) + 1,
                )
                timings[size].append((time.perf_counter() - started) * 1000.0)
                cursor = max(row["id"] for row in rows)
        commits = []
        for _ in range(rounds):
            started = time.perf_counter()
            await connection.execute(
                "UPDATE campaignd.senders SET updated_at = now() WHERE id = $1", sender_id
            )
            commits.append((time.perf_counter() - started) * 1000.0)

        print(f"claim_recipients on a prepared {recipients:,}-recipient campaign, {rounds} claims per size:")
        for size, values in timings.items():
            print(
                f"  {size:>6,} rows: median {statistics.median(values):6.1f} ms"
                f"  (min {min(values):.1f}, max {max(values):.1f})"
            )
        print(f"  one-row commit: median {statistics.median(commits):.1f} ms")
    finally:
        await connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=int_list,
        default=[64, 1000],
        help="comma-separated claim sizes (64,1000)",
    )
    parser.add_argument("--rounds", type=int, default=16, help="claims per size (16)")
    parser.add_argument("--recipients", type=int, default=200_000, help="campaign size (200000)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the database folder")
    args = parser.parse_args()
    with (
        bench_workdir("campaignd-claim-sizes-", keep=args.keep_workdir) as workdir,
        embedded_postgres(workdir) as postgres,
    ):
        asyncio.run(main_async(postgres, args.sizes, args.rounds, args.recipients))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
