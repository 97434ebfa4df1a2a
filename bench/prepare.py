"""A campaign's preparation: the checks over its recipients before they are sent.

    python bench/prepare.py [--recipients 50000,200000,1000000] [--rounds 2] [--batch-size 1000]
                            [--no-analyze]

A lane skips the recipients with no address or with variables that cannot fill the message
(``prepare_skip_no_address``, ``prepare_skip_missing_variables``), then those repeating an
earlier address (``prepare_skip_duplicates``), runs the pre-flight on the first recipients and
recounts the campaign's counters (``prepare_finish``). A campaign of more than
PREPARE_HEAD_BATCHES x batch_size recipients is prepared head first: its first send waits only
for the head; the tail is prepared while the head is sent. Measured per size, each part in a
transaction rolled back after each round so that every round sees the same rows:

- whole: the one-step preparation of the whole campaign (what every campaign waited for
  before its first send until head-first preparation; what one within its head still does);
- head: what the first send of a bigger campaign waits for now;
- tail: the rest, while the head is sent.

Embedded PostgreSQL at default durability; per size, a campaign loaded as a host loads it
(COPY; one variable per recipient, ~0.5% bad rows of each kind), then ANALYZE (unless
``--no-analyze``: a new installation's first campaigns, which the planner knows nothing of) and
CHECKPOINT.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import asyncpg

from _common import Postgres, bench_workdir, create_campaign, embedded_postgres, int_list
from _payload import MESSAGE_TEMPLATE
from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.dispatch import BEYOND_LAST_ID, FIRST_ID, PREFLIGHT_SAMPLE, PREPARE_HEAD_BATCHES
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


Step = tuple[str, tuple[object, ...]]


def skips(campaign_id: str, names: list[str], first_id: int, below: int, *, phone: bool = True) -> list[Step]:
    """The skips, duplicates keyed as phone numbers (WhatsApp, Twilio) by default, the costlier
    key; ``phone=False`` keys them as written (the http provider, Messenger)."""
    return [
        ("prepare_skip_no_address", (campaign_id, first_id, below)),
        ("prepare_skip_missing_variables", (campaign_id, first_id, below, names)),
        ("prepare_duplicates_without_nested_loops", ()),
        (
            "prepare_skip_duplicates" if below == BEYOND_LAST_ID else "prepare_skip_duplicates_in_head",
            (campaign_id, first_id, below, phone),
        ),
        ("prepare_duplicates_done", ()),
    ]


def finish(campaign_id: str) -> list[Step]:
    return [("prepare_lock_campaign", (campaign_id,)), ("prepare_finish", (campaign_id,))]


async def timed(connection: asyncpg.Connection, steps: list[Step]) -> float:
    """Seconds for the statements in one transaction, rolled back."""
    try:
        async with connection.transaction():
            started = time.perf_counter()
            for name, args in steps:
                await connection.execute(QUERIES[name], *args)
            took = time.perf_counter() - started
            raise _RolledBack
    except _RolledBack:
        pass
    return took


async def main_async(
    postgres: Postgres, sizes: list[int], rounds: int, batch_size: int, *, analyze: bool = True
) -> None:
    connection = await db.connect(DatabaseConfig(url=postgres.url))  # type: ignore[arg-type]
    head = PREPARE_HEAD_BATCHES * batch_size
    try:
        await migrate(connection)
        names = sorted(Template(MESSAGE_TEMPLATE).variables)
        print(f"head: {PREPARE_HEAD_BATCHES} x batch_size {batch_size} = {head:,} fresh recipients")
        if not analyze:
            # A new installation's first campaigns, loaded and started before autovacuum looks.
            await connection.execute("ALTER TABLE campaignd.recipients SET (autovacuum_enabled = false)")
            print("recipients never analyzed: the planner knows nothing of the campaigns")
        print("duplicates keyed as phone numbers (WhatsApp, Twilio); 'tail exact': keyed as written (http)")
        print(f"{'recipients':>10} {'round':>5} {'whole':>8} {'head':>8} {'tail':>8} {'tail exact':>10}")
        for size in sizes:
            campaign_id = await create_campaign(connection, size)
            for statement in BAD_ROWS:
                await connection.execute(statement, campaign_id)
            if analyze:
                await connection.execute("ANALYZE campaignd.recipients")
            await connection.execute("CHECKPOINT")
            whole_steps = [
                *skips(campaign_id, names, FIRST_ID, BEYOND_LAST_ID),
                ("preflight_sample", (campaign_id, FIRST_ID, BEYOND_LAST_ID, PREFLIGHT_SAMPLE)),
                *finish(campaign_id),
            ]
            found = await connection.fetchval(QUERIES["prepare_head_boundary"], campaign_id, head)
            below = BEYOND_LAST_ID if found is None else int(found)
            head_steps = [
                ("prepare_hold_campaign", (campaign_id,)),
                ("prepare_head_boundary", (campaign_id, head)),
                *skips(campaign_id, names, FIRST_ID, below),
                ("preflight_sample", (campaign_id, FIRST_ID, below, PREFLIGHT_SAMPLE)),
                ("prepare_head_finish", (campaign_id, below, 0)),
            ]
            tail_steps = [
                ("prepare_hold_campaign", (campaign_id,)),
                *skips(campaign_id, names, below, BEYOND_LAST_ID),
                *finish(campaign_id),
            ]
            tail_exact_steps = [
                ("prepare_hold_campaign", (campaign_id,)),
                *skips(campaign_id, names, below, BEYOND_LAST_ID, phone=False),
                *finish(campaign_id),
            ]
            firsts: list[float] = []
            for index in range(1, rounds + 1):
                whole = await timed(connection, whole_steps)
                if found is None:
                    firsts.append(whole)
                    print(f"{size:>10,} {index:>5} {whole * 1000:>5.0f} ms   (within its head)", flush=True)
                    continue
                first = await timed(connection, head_steps)
                rest = await timed(connection, tail_steps)
                rest_exact = await timed(connection, tail_exact_steps)
                firsts.append(first)
                print(
                    f"{size:>10,} {index:>5} {whole * 1000:>5.0f} ms {first * 1000:>5.0f} ms"
                    f" {rest * 1000:>5.0f} ms {rest_exact * 1000:>7.0f} ms",
                    flush=True,
                )
            median = statistics.median(firsts) * 1000
            print(f"{size:>10,} median {median:.0f} ms before the first send", flush=True)
    finally:
        await connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--recipients",
        type=int_list,
        default=[50_000, 200_000, 1_000_000],
        help="comma-separated campaign sizes (50000,200000,1000000)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="timed preparations per size (2)")
    parser.add_argument("--batch-size", type=int, default=1000, help="the daemon's batch_size (1000)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the database folder")
    parser.add_argument(
        "--no-analyze",
        action="store_true",
        help="never ANALYZE the recipients (a campaign loaded and started before autovacuum looks)",
    )
    args = parser.parse_args()
    with (
        bench_workdir("campaignd-prepare-", keep=args.keep_workdir) as workdir,
        embedded_postgres(workdir) as postgres,
    ):
        asyncio.run(
            main_async(postgres, args.recipients, args.rounds, args.batch_size, analyze=not args.no_analyze)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
