"""Daemons announcing themselves in campaignd.daemons: what a replica sees of its peers.

The statements are run as the balancer runs them (campaignd.leasing), against a real
PostgreSQL; the decision they feed is tested in test_leasing, the whole loop in test_dispatch.
"""

from __future__ import annotations

import asyncpg

from campaignd import leasing
from tests.conftest import register_sender


async def test_a_peer_is_seen_with_the_lanes_it_holds_now(conn: asyncpg.Connection) -> None:
    for sender in ("a", "b", "c"):
        await register_sender(conn, sender)
    assert await leasing.announce(conn, "one", ["a", "b", "c"], 10.0, first=True) == []
    await leasing.announce(conn, "two", ["a", "c"], 10.0, first=True)
    # Two leases of "two": one live, one expired (it died holding it; not counted).
    await conn.execute(
        "UPDATE campaignd.senders SET lease_owner = 'two', lease_expires_at = now() + interval '1 minute'"
        " WHERE id = 'a'"
    )
    await conn.execute(
        "UPDATE campaignd.senders SET lease_owner = 'two', lease_expires_at = now() - interval '1 second'"
        " WHERE id = 'b'"
    )

    peers = await leasing.announce(conn, "one", ["a", "b", "c"], 10.0, first=False)

    assert peers == [leasing.Peer("two", frozenset({"a", "c"}), 1)]


async def test_a_daemon_that_stopped_announcing_is_not_a_peer(conn: asyncpg.Connection) -> None:
    await leasing.announce(conn, "one", ["a"], 10.0, first=True)
    await leasing.announce(conn, "frozen", ["a"], 10.0, first=True)
    await conn.execute(
        "UPDATE campaignd.daemons SET expires_at = now() - interval '1 second' WHERE owner = 'frozen'"
    )
    assert await leasing.announce(conn, "one", ["a"], 10.0, first=False) == []
    # It comes back by announcing again.
    await leasing.announce(conn, "frozen", ["a"], 10.0, first=False)
    assert [peer.owner for peer in await leasing.announce(conn, "one", ["a"], 10.0, first=False)] == [
        "frozen"
    ]


async def test_rows_live_for_two_intervals_and_a_clean_stop_removes_them(conn: asyncpg.Connection) -> None:
    await leasing.announce(conn, "one", ["a"], 10.0, first=True)
    lifetime = await conn.fetchval(
        "SELECT extract(epoch FROM expires_at - seen_at) FROM campaignd.daemons WHERE owner = 'one'"
    )
    assert lifetime == 10.0 * leasing.PRESENCE_INTERVALS
    await leasing.retire(conn, "one")
    assert await conn.fetchval("SELECT count(*) FROM campaignd.daemons") == 0


async def test_a_restarted_owner_starts_afresh_and_old_rows_are_dropped(
    conn: asyncpg.Connection,
) -> None:
    await leasing.announce(conn, "host:1", ["a"], 10.0, first=True)
    await conn.execute(
        "UPDATE campaignd.daemons SET started_at = now() - interval '2 days',"
        " expires_at = now() - interval '2 days'"
    )
    await leasing.announce(conn, "host:2", ["a"], 10.0, first=True)
    # A daemon gone for over a day is dropped by the next announcement of any daemon.
    assert await conn.fetchval("SELECT count(*) FROM campaignd.daemons WHERE owner = 'host:1'") == 0

    await leasing.announce(conn, "host:1", ["a"], 10.0, first=True)
    await conn.execute("UPDATE campaignd.daemons SET started_at = now() - interval '1 hour'")
    await leasing.announce(conn, "host:1", ["a"], 10.0, first=False)
    kept = await conn.fetchval(
        "SELECT now() - started_at > interval '59 minutes' FROM campaignd.daemons WHERE owner = 'host:1'"
    )
    assert kept, "a later announcement keeps the start time"
    await leasing.announce(conn, "host:1", ["a"], 10.0, first=True)
    restarted = await conn.fetchval(
        "SELECT now() - started_at < interval '1 minute' FROM campaignd.daemons WHERE owner = 'host:1'"
    )
    assert restarted, "the first announcement of a new process resets it"
