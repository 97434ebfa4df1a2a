"""A campaign's preparation: the checks over all its recipients before its first send.

    python bench/prepare.py [--recipients 50000,200000,1000000] [--rounds 2]

Before a lane sends a campaign it skips, in one transaction, the recipients with no address
or with variables that cannot fill the message (``prepare_skip_no_address``,
``prepare_skip_missing_variables``) and then those repeating an earlier address
(``prepare_skip_duplicates``): each statement reads every recipient of the campaign, so the
campaign's first send waits for them. Embedded PostgreSQL at default durability; per size, a
campaign loaded as a host loads it (COPY; one variable per recipient, ~0.5% bad rows of each
kind), ANALYZE and CHECKPOINT, then the statements timed one by one, as the daemon runs them,
in a transaction rolled back after each round so that every round sees the same rows.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import asyncpg

from _common import Postgres, bench_workdir, create_campaign, embedded_postgres
from _payload import MESSAGE_TEMPLATE
from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.render import Template
from campaignd.schema import migrate
from campaignd.sql import QUERIES

# Bad rows a real import carries, each in ~0.5% of the campaign.
BAD_ROWS = (
    "UPDATE campaignd.recipients SET address = NULL WHERE campaign_id = $1 AND id % 211 = 0",
    "UPDATE campaignd.recipients SET variables = '{}' WHERE campaign_id = $1 AND id % 223 = 1",
    "UPDATE campaignd.recipients SET variables = '{\"name\": null}' WHERE campaign_id = $1 AND id % 227 = 2",
    "UPDATE campaignd.recipients r SET address = ' ' || first.address"
    " FROM (SELECT address FROM campaignd.recipients WHERE campaign_id = $1 ORDER BY id LIMIT 1) first"
    " WHERE r.campaign_id = $1 AND r.id % 229 = 3",
)


class _RolledBack(Exception):
    pass


async def prepare_once(
    connection: asyncpg.Connection, campaign_id: str, names: list[str]
) -> dict[str, float]:
    """Milliseconds per statement, in the daemon's order; the transaction is rolled back."""
    took: dict[str, float] = {}
    steps: list[tuple[str, tuple[object, ...]]] = [
        ("prepare_skip_no_address", (campaign_id,)),
        ("prepare_skip_missing_variables", (campaign_id, names)),
        ("prepare_skip_duplicates", (campaign_id,)),
    ]
    try:
        async with connection.transaction():
            for name, args in steps:
                started = time.perf_counter()
                await connection.execute(QUERIES[name], *args)
                took[name] = (time.perf_counter() - started) * 1000
            raise _RolledBack
    except _RolledBack:
        pass
    return took


async def main_async(postgres: Postgres, sizes: list[int], rounds: int) -> None:
    connection = await db.connect(DatabaseConfig(url=postgres.url))  # type: ignore[arg-type]
    try:
        await migrate(connection)
        names = sorted(Template(MESSAGE_TEMPLATE).variables)
        print(
            f"{'recipients':>10} {'round':>5} {'no address':>11} {'variables':>10}"
            f" {'duplicates':>11} {'in all':>8}"
        )
        for size in sizes:
            campaign_id = await create_campaign(connection, size)
            for statement in BAD_ROWS:
                await connection.execute(statement, campaign_id)
            await connection.execute("ANALYZE campaignd.recipients")
            await connection.execute("CHECKPOINT")
            totals = []
            for index in range(1, rounds + 1):
                took = await prepare_once(connection, campaign_id, names)
                totals.append(sum(took.values()))
                print(
                    f"{size:>10,} {index:>5} {took['prepare_skip_no_address']:>8.0f} ms"
                    f" {took['prepare_skip_missing_variables']:>7.0f} ms"
                    f" {took['prepare_skip_duplicates']:>8.0f} ms {totals[-1] / 1000:>6.2f} s",
                    flush=True,
                )
            median = statistics.median(totals) / 1000
            print(f"{size:>10,} median {median:.2f} s before the first send", flush=True)
    finally:
        await connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--recipients",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[50_000, 200_000, 1_000_000],
        help="comma-separated campaign sizes (50000,200000,1000000)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="timed preparations per size (2)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the database folder")
    args = parser.parse_args()
    with (
        bench_workdir("campaignd-prepare-", keep=args.keep_workdir) as workdir,
        embedded_postgres(workdir) as postgres,
    ):
        asyncio.run(main_async(postgres, args.recipients, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
