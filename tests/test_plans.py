"""Statements planned without statistics: a new installation's first big campaigns.

Until autovacuum first analyzes ``campaignd.recipients``, the planner knows nothing of how
many rows a campaign or a lane's claims have, and may take thousands for one. Plans are read
with EXPLAIN, run through the daemon's own code, at a size where the bad plan was chosen.
(The duplicates' plan is tested end to end: tests/test_provider_reactions.py.)
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from campaignd.dispatch import record_outcomes
from campaignd.outcomes import RecipientState, RecipientUpdate, outcome_columns
from campaignd.sql import QUERIES
from tests.conftest import add_numbered_recipients, create_campaign, hold_lane, mark_prepared


class Explaining:
    """A connection on which ``record_outcomes`` is explained, not run; the rest as is."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        self.plan: dict[str, Any] | None = None

    async def execute(self, query: str, *args: Any) -> str:
        return await self.connection.execute(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> dict[str, int] | None:
        if query != QUERIES["record_outcomes"]:
            return await self.connection.fetchrow(query, *args)  # type: ignore[no-any-return]
        explained = await self.connection.fetchval("EXPLAIN (FORMAT JSON) " + query, *args)
        self.plan = (json.loads(explained) if isinstance(explained, str) else explained)[0]["Plan"]
        return {"lane_held": 1, "applied": 0}

    def is_closed(self) -> bool:
        return self.connection.is_closed()

    def is_in_transaction(self) -> bool:
        return self.connection.is_in_transaction()

    def terminate(self) -> None:
        self.connection.terminate()


def scans(node: dict[str, Any]) -> list[tuple[str, str]]:
    """(node type, relation) of every node of the plan that reads a table."""
    found = [(node["Node Type"], node["Relation Name"])] if "Relation Name" in node else []
    for child in node.get("Plans", []):
        found.extend(scans(child))
    return found


def nested_loops_over_the_batch(node: dict[str, Any]) -> list[dict[str, Any]]:
    """Nested loops that read the batch's outcomes (the unnest) again for each outer row."""
    found = []
    children = node.get("Plans", [])
    if node["Node Type"] == "Nested Loop" and any(_reads_the_batch(child) for child in children[1:]):
        found.append(node)
    for child in children:
        found.extend(nested_loops_over_the_batch(child))
    return found


def _reads_the_batch(node: dict[str, Any]) -> bool:
    return node["Node Type"] == "Function Scan" or any(_reads_the_batch(c) for c in node.get("Plans", []))


async def test_a_batch_of_outcomes_is_joined_with_its_claims_in_one_pass_without_statistics(
    conn: asyncpg.Connection,
) -> None:
    # From some 500,000 rows in a table never analyzed, the planner took the lane's 1,000
    # claims for one row and read the batch's 1,000 outcomes again for each: 170-250 ms a
    # batch instead of ~8, a lane held near 4,000 messages a second.
    await conn.execute("ALTER TABLE campaignd.recipients SET (autovacuum_enabled = false)")
    campaign_id = await create_campaign(conn, "sms", 1)
    await add_numbered_recipients(conn, campaign_id, 600_000)
    await mark_prepared(conn, campaign_id)
    lane = await hold_lane(conn, "sms")
    claimed = await conn.fetch(QUERIES["claim_recipients"], *lane, campaign_id, 0, 1000, 60.0, 1)
    assert len(claimed) == 1000
    statistics = await conn.fetchval(
        "SELECT reltuples FROM pg_class WHERE oid = 'campaignd.recipients'::regclass"
    )
    assert statistics in (-1, 0), "the table has statistics: the planner would know the claims"
    batch = [RecipientUpdate(row["id"], RecipientState.SENT, provider_message_id="m") for row in claimed]

    explaining = Explaining(conn)
    await record_outcomes(explaining, lane, outcome_columns(batch))  # type: ignore[arg-type]

    assert explaining.plan is not None
    assert nested_loops_over_the_batch(explaining.plan) == []
    assert not conn.is_in_transaction()


async def test_a_batch_of_outcomes_reads_its_own_rows_by_key_beside_many_campaigns_and_lanes(
    conn: asyncpg.Connection,
) -> None:
    # Planned without nested loops, a join finds its rows by hashing what it joins: written
    # as joins, the batch's campaigns and its counters were found by reading every campaign,
    # once per batch. Here 50,000 older campaigns and another lane's 5,000 claims.
    campaign_id = await create_campaign(conn, "sms", 1)
    await add_numbered_recipients(conn, campaign_id, 50_000)
    await mark_prepared(conn, campaign_id)
    other = await create_campaign(conn, "other", 1)
    await add_numbered_recipients(conn, other, 20_000)
    await mark_prepared(conn, other)
    await conn.execute(
        "INSERT INTO campaignd.campaigns (name, sender_id, message)"
        " SELECT 'older ' || g, 'other', '{}'::jsonb FROM generate_series(1, 50000) g"
    )
    await conn.execute("ANALYZE campaignd.campaigns")
    await conn.execute("ANALYZE campaignd.recipients")
    other_lane = await hold_lane(conn, "other")
    assert len(await conn.fetch(QUERIES["claim_recipients"], *other_lane, other, 0, 5000, 60.0, 1)) == 5000
    lane = await hold_lane(conn, "sms")
    claimed = await conn.fetch(QUERIES["claim_recipients"], *lane, campaign_id, 0, 1000, 60.0, 1)
    batch = [RecipientUpdate(row["id"], RecipientState.SENT, provider_message_id="m") for row in claimed]

    explaining = Explaining(conn)
    await record_outcomes(explaining, lane, outcome_columns(batch))  # type: ignore[arg-type]

    assert explaining.plan is not None
    read = scans(explaining.plan)
    assert ("Seq Scan", "campaigns") not in read
    assert ("Seq Scan", "recipients") not in read
    assert nested_loops_over_the_batch(explaining.plan) == []
