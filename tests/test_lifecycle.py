"""What a host does to a campaign while it is being sent, and the knobs around it."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from campaignd.cli import build_parser
from campaignd.fakeprovider import FakeProvider
from tests.conftest import (
    assert_counters_match,
    bug_planted,
    campaign,
    create_campaign,
    daemon_config,
    state_counts,
    wait_for,
    wait_sent,
    wait_status,
    with_database,
    write_config,
)


async def test_host_pauses_then_resumes_a_campaign(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 100.0}})
    campaign_id = await create_campaign(conn, "sms", 600)
    daemon = daemons(config)

    await wait_sent(conn, campaign_id, 50, timeout=30)
    await conn.execute("UPDATE campaignd.campaigns SET status = 'paused' WHERE id = $1", campaign_id)

    async def quiet() -> bool:
        counts = await state_counts(conn, campaign_id)
        return "in_flight" not in counts

    await wait_for(quiet, timeout=30, what="claims given back")
    await asyncio.sleep(0.5)
    sent_while_paused = fake.request_count()
    await asyncio.sleep(1.5)
    assert fake.request_count() == sent_while_paused, "kept sending a paused campaign"
    assert (await campaign(conn, campaign_id))["status"] == "paused"
    assert sent_while_paused < 600

    await conn.execute("UPDATE campaignd.campaigns SET status = 'sending' WHERE id = $1", campaign_id)
    await wait_status(conn, campaign_id, "completed", timeout=60)
    assert fake.accepted_count() == 600 and fake.request_count() == 600
    await assert_counters_match(conn, campaign_id)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_a_second_sigterm_ends_the_drain_at_once(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # Every request hangs past the drain, so the first SIGTERM's drain would wait its whole
    # drain_seconds.
    fake.behaviour.latency_seconds = 300.0
    config = daemon_config(
        tmp_path,
        database_url,
        {"sms": {"url": fake.url, "rate_per_second": 1000.0, "timeout_seconds": 600.0}},
        drain_seconds=120.0,
    )
    campaign_id = await create_campaign(conn, "sms", 40)
    daemon = daemons(config)

    async def in_the_air() -> bool:
        return fake.request_count() > 0

    await wait_for(in_the_air, timeout=30, what="requests at the provider")
    daemon.signal(signal.SIGTERM)

    async def draining() -> bool:
        return "shutdown_requested" in daemon.log()

    await wait_for(draining, timeout=30, what="the drain to begin")
    await asyncio.sleep(0.5)
    daemon.signal(signal.SIGTERM)
    # The drain read its deadline once and slept through the second signal, for all of its
    # 120 s; 60 s is as long as any stop here may take.
    assert await asyncio.to_thread(daemon.wait, 60) == 0
    assert "drain_timeout" in daemon.log()
    # Nothing was answered, so nothing is final; none is lost (the cut-off sends are resent,
    # with their keys, by the next owner).
    counts = await state_counts(conn, campaign_id)
    assert counts.keys() <= {"pending", "in_flight"} and sum(counts.values()) == 40, counts


async def test_campaign_deleted_while_sending_stops_its_work_without_crashing(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 100.0}})
    doomed = await create_campaign(conn, "sms", 1000, name="doomed")
    daemon = daemons(config)

    await wait_sent(conn, doomed, 30, timeout=30)
    await conn.execute("DELETE FROM campaignd.campaigns WHERE id = $1", doomed)
    await asyncio.sleep(1.0)
    after_delete = fake.request_count()
    await asyncio.sleep(1.0)
    assert fake.request_count() == after_delete
    assert after_delete < 1000

    survivor = await create_campaign(
        conn, "sms", [(f"+1777{i:07d}", {"name": "x"}) for i in range(50)], name="survivor"
    )
    await wait_status(conn, survivor, "completed", timeout=30)
    assert daemon.process.poll() is None
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_campaign_rate_cap_applies_beneath_the_senders_rate(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 1000.0}})
    campaign_id = await create_campaign(conn, "sms", 60, rate_per_second=20.0)
    daemons(config)
    row = await wait_status(conn, campaign_id, "completed", timeout=60)
    elapsed = (row["completed_at"] - row["started_at"]).total_seconds()
    # 60 messages at 20/s with a burst of 2: close to 3 s, never the sender's 1000/s.
    assert elapsed >= 2.0
    assert fake.max_requests_in_window(1.0) <= 20 + 2


async def test_in_doubt_claims_fail_instead_of_resending_when_resend_is_off(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # Slow answers: many requests are in the air when the daemon is killed.
    fake.behaviour.latency_seconds = 0.3
    config = daemon_config(
        tmp_path,
        database_url,
        {"sms": {"url": fake.url, "rate_per_second": 200.0, "resend_in_doubt": False}},
        lease_seconds=2.0,
    )
    campaign_id = await create_campaign(conn, "sms", 500)
    first = daemons(config)

    async def in_the_air() -> bool:
        counts = await state_counts(conn, campaign_id)
        return counts.get("sent", 0) >= 50 and counts.get("in_flight", 0) >= 10

    await wait_for(in_the_air, timeout=30, what="sends in flight")
    first.kill()
    in_flight_at_kill = (await state_counts(conn, campaign_id))["in_flight"]

    daemons(config)
    row = await wait_status(conn, campaign_id, "completed", timeout=60)
    in_doubt = await conn.fetchval(
        "SELECT count(*) FROM campaignd.recipients"
        " WHERE campaign_id = $1 AND state = 'failed' AND error_code = 'in_doubt'",
        campaign_id,
    )
    assert in_doubt == in_flight_at_kill
    assert row["failed_count"] == in_doubt and row["sent_count"] == 500 - in_doubt
    assert fake.duplicate_keys() == {}, "nothing is resent when resend_in_doubt is off"
    await assert_counters_match(conn, campaign_id)


def campaignd_status(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "campaignd", "status", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_status_command_reports_progress_as_json(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}})
    campaign_id = await create_campaign(conn, "sms", [("+15550000001", {"name": "a"}), (None, {"name": "b"})])
    daemons(config)
    await wait_status(conn, campaign_id, "completed", timeout=30)

    def status(*extra: str) -> subprocess.CompletedProcess[str]:
        return campaignd_status(config, *extra)

    listing = status("--json")
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert [r["id"] for r in rows] == [campaign_id]
    assert (rows[0]["status"], rows[0]["sent_count"], rows[0]["skipped_count"], rows[0]["progress"]) == (
        "completed",
        1,
        1,
        100.0,
    )
    one = json.loads(status(campaign_id, "--json").stdout)
    assert one[0]["errors"] == [{"state": "skipped", "error_code": "no_address", "n": 1}]
    table = status()
    assert table.returncode == 0 and "completed" in table.stdout
    missing = status("00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 1


async def test_status_shows_names_and_reasons_as_written_never_as_markup(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection
) -> None:
    # Reasons quote providers' texts; a "[/...]" in one made the table raise, and every
    # campaign's status with it.
    config = write_config(tmp_path / "c.toml", {"database": {"url": database_url}})
    named = await create_campaign(conn, "sms", 1, name="[bold]spring[/bold] sale")
    paused = await create_campaign(conn, "sms", 1, name="paused")
    reason = "provider rejected the campaign: 132001: template not found [/en_US]"
    await conn.execute(
        "UPDATE campaignd.campaigns SET status = 'paused', status_reason = $2 WHERE id = $1", paused, reason
    )
    await conn.execute(
        "UPDATE campaignd.recipients SET state = 'skipped', error_code = '[red]x[/]' WHERE campaign_id = $1",
        named,
    )

    def status(*extra: str) -> subprocess.CompletedProcess[str]:
        return campaignd_status(config, *extra)

    listing = status()
    assert listing.returncode == 0, listing.stderr
    assert "[/en_US]" in listing.stdout and "[bold]spring[/bold] sale" in listing.stdout
    one = status(named)
    assert one.returncode == 0, one.stderr
    assert "[red]x[/]: 1" in one.stdout


async def test_status_of_a_database_without_the_schema_is_one_plain_line(tmp_path: Path, pg_url: str) -> None:
    name = "raw_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        cases = {
            "no schema": with_database(pg_url, name),
            "no database": with_database(pg_url, name + "_missing"),
        }
        for case, url in cases.items():
            result = campaignd_status(write_config(tmp_path / f"{case}.toml", {"database": {"url": url}}))
            assert result.returncode == 1, (case, result.stderr)
            assert "Traceback" not in result.stderr, (case, result.stderr)
            assert result.stderr.startswith("campaignd: "), (case, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1, (case, result.stderr)
        assert "run `campaignd migrate`" in campaignd_status(tmp_path / "no schema.toml").stderr
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name}")
        await admin.close()


async def test_demo_without_the_embedded_postgresql_names_the_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from campaignd import demo
    from campaignd.embedded import INSTALL_HINT, EmbeddedUnavailable

    def unavailable(*_args: object, **_kwargs: object) -> None:
        raise EmbeddedUnavailable(f"the embedded PostgreSQL is not installed: {INSTALL_HINT}")

    monkeypatch.setattr(demo, "start_embedded", unavailable)
    # The demo configures logging for the whole process, to the stream capsys replaces and then
    # closes: every later test that logs would write to a closed file.
    monkeypatch.setattr(demo, "configure_logging", lambda *_args: None)
    args = build_parser().parse_args(["demo", "--data-dir", str(tmp_path / "pgdata")])

    assert await demo.run_demo(args) == 1
    assert "pip install 'campaignd[embedded]'" in " ".join(capsys.readouterr().out.split())


def test_demo_runs_to_completion_on_an_embedded_database(tmp_path: Path) -> None:
    """The README's first command, smaller: exits 0 with a completed campaign and a summary."""
    demo = subprocess.run(
        [
            sys.executable,
            "-m",
            "campaignd",
            "demo",
            "--recipients",
            "400",
            "--rate",
            "2000",
            "--data-dir",
            str(tmp_path / "pgdata"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "completed" in demo.stdout
    assert "Counters match the recipients table: True" in demo.stdout
    assert "delivered twice" in demo.stdout


async def test_campaign_resumed_while_its_paused_claims_still_settle_completes(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # Slow answers keep claims in the air across the pause and the resume.
    fake.behaviour.latency_seconds = 0.6
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 200.0}})
    campaign_id = await create_campaign(conn, "sms", 300)
    daemon = daemons(config)

    async def in_the_air() -> bool:
        return (await state_counts(conn, campaign_id)).get("in_flight", 0) >= 10

    await wait_for(in_the_air, timeout=30, what="claims in flight")
    await conn.execute("UPDATE campaignd.campaigns SET status = 'paused' WHERE id = $1", campaign_id)

    async def noticed() -> bool:
        return "campaign_no_longer_sending" in daemon.log()

    await wait_for(noticed, timeout=10, what="the lane to notice the pause")
    assert (await state_counts(conn, campaign_id)).get("in_flight", 0) > 0, "resume before the claims settle"
    await conn.execute("UPDATE campaignd.campaigns SET status = 'sending' WHERE id = $1", campaign_id)

    await wait_status(conn, campaign_id, "completed", timeout=60)
    await assert_counters_match(conn, campaign_id)
    assert len({a.recipient_id for a in fake.accepted()}) == 300
    # The same lane carried on: it did not have to go idle and be taken again to see the resume.
    assert daemon.log().count('"lane_acquired"') == 1


async def test_claims_stop_while_outcomes_cannot_be_written(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    """A claim counts until its outcome is committed: slow outcome writes must not let in_flight
    rows pile up (each one an in-doubt resend if the lease then lapsed)."""
    concurrency, batch = 8, 20
    config = daemon_config(
        tmp_path,
        database_url,
        {"sms": {"url": fake.url, "rate_per_second": 1000.0}},
        concurrency=concurrency,
        batch_size=batch,
        lease_seconds=6.0,
    )
    campaign_id = await create_campaign(conn, "sms", 1000)
    daemon = daemons(config)

    async def started() -> bool:
        return (await campaign(conn, campaign_id))["sent_count"] >= 50

    await wait_for(started, timeout=30, what="50 sent")
    most_in_flight = 0
    # Outcome batches lock the campaign row first: holding it stalls every outcome write.
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM campaignd.campaigns WHERE id = $1 FOR UPDATE", campaign_id)
        for _ in range(12):
            await asyncio.sleep(0.25)
            in_flight = await conn.fetchval(
                "SELECT count(*) FROM campaignd.recipients WHERE campaign_id = $1 AND state = 'in_flight'",
                campaign_id,
            )
            most_in_flight = max(most_in_flight, in_flight)
    assert most_in_flight <= concurrency + batch, f"{most_in_flight} in flight while outcomes were stuck"

    await wait_status(conn, campaign_id, "completed", timeout=60)
    await assert_counters_match(conn, campaign_id)
    assert fake.duplicate_keys() == {}
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_a_campaign_completes_once_its_last_outcomes_are_written_not_a_poll_later(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # The poll and the watchdog are a minute away: only the lane noticing that its last
    # claims have landed can complete the campaign within the timeout. (The last claim finds
    # nothing left while sends are still in the air; the lane used to sleep a whole poll.)
    config = daemon_config(
        tmp_path, database_url, {"sms": {"url": fake.url}}, poll_seconds=60.0, watchdog_interval=60.0
    )
    campaign_id = await create_campaign(conn, "sms", 500)
    daemon = daemons(config)

    await wait_status(conn, campaign_id, "completed", timeout=30)
    assert (await campaign(conn, campaign_id))["sent_count"] == 500
    await assert_counters_match(conn, campaign_id)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_a_busy_lane_picks_up_a_new_campaign_at_once(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # poll_seconds is long: only the NOTIFY can explain a quick pickup. The slow campaign is
    # capped by its own rate; its claims must not fill the lane and starve the newcomer.
    config = daemon_config(
        tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 500.0}}, poll_seconds=5.0
    )
    slow = await create_campaign(conn, "sms", 2000, name="slow", rate_per_second=20.0)
    daemons(config)

    _, started = await start_a_newcomer_beside(conn, slow, once_sent=20, recipients=5)
    assert time.monotonic() - started < 3.0, "the new campaign waited behind the busy lane"
    assert (await campaign(conn, slow))["status"] == "sending"


async def start_a_newcomer_beside(
    conn: asyncpg.Connection, busy: str, *, once_sent: int, recipients: int
) -> tuple[str, float]:
    """Once ``busy`` has sent ``once_sent``, start a small campaign on the same sender and wait
    for it to complete; returns its id and when it was started (time.monotonic())."""

    async def busy_sending() -> bool:
        return (await campaign(conn, busy))["sent_count"] >= once_sent

    await wait_for(busy_sending, timeout=30, what="the busy campaign to send")
    addresses = [(f"+1888{i:07d}", {"name": "n"}) for i in range(recipients)]
    newcomer = await create_campaign(conn, "sms", addresses, name="newcomer", start=False)
    started = time.monotonic()
    await conn.execute("UPDATE campaignd.campaigns SET status = 'sending' WHERE id = $1", newcomer)
    await wait_status(conn, newcomer, "completed", timeout=30)
    return newcomer, started


async def test_a_new_campaign_is_not_queued_behind_a_capped_campaigns_claims(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # A campaign capped at 5/s keeps about 2 s of its sends claimed (11), more than the lane's
    # 4 send workers. Those claims used to wait for the cap in the lane's one send queue,
    # ahead of a newly started campaign's: the newcomer's first request came after several
    # more of the capped campaign's. Now they wait for their tokens apart, and the newcomer
    # goes out among the next one or two.
    config = daemon_config(
        tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 500.0}}, concurrency=4
    )
    capped = await create_campaign(conn, "sms", 500, name="capped", rate_per_second=5.0)
    daemons(config)

    newcomer, started = await start_a_newcomer_beside(conn, capped, once_sent=10, recipients=3)
    accepted = fake.accepted()
    first = min(a.arrived for a in accepted if a.campaign_id == newcomer)
    capped_before = [a for a in accepted if a.campaign_id == capped and started <= a.arrived < first]
    assert len(capped_before) <= 4, f"{len(capped_before)} capped sends went out before the newcomer's first"
    assert (await campaign(conn, capped))["status"] == "sending"


async def test_a_capped_campaigns_unsendable_recipients_do_not_spend_its_cap(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # Capped at one send per 2 s, 20 recipients that turn out unsendable at send time (an
    # address the provider refuses, a variable that does not render) ahead of 2 good ones.
    # They used to take a cap token each on their way to being skipped, so the first good one
    # went out ~40 s after the start. Skipped before the cap, they cost it nothing.
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 100.0}})
    refused = [(f"+1555 {i:07d}", {"name": "refused"}) for i in range(10)]
    unrenderable = [(f"+1555{i:07d}", {"name": {"nested": i}}) for i in range(10)]
    good = [(f"+1666{i:07d}", {"name": "good"}) for i in range(2)]
    campaign_id = await create_campaign(conn, "sms", refused + unrenderable + good, rate_per_second=0.5)
    daemons(config)

    row = await wait_status(conn, campaign_id, "completed", timeout=20)
    assert (row["sent_count"], row["skipped_count"]) == (2, 20)
    assert await state_counts(conn, campaign_id) == {"sent": 2, "skipped": 20}
    assert sorted(a.address for a in fake.accepted()) == ["+16660000000", "+16660000001"]
    await assert_counters_match(conn, campaign_id)


async def test_a_capped_campaign_edited_while_paused_sends_the_edited_message(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # Capped at one send per 5 s, the second recipient's request is prepared while it waits
    # for its token. The host pauses the campaign, edits the message and resumes it before
    # that token comes: the request must carry the message as it is now.
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 100.0}})
    campaign_id = await create_campaign(conn, "sms", 3, rate_per_second=0.2)
    daemon = daemons(config)

    async def first_sent() -> bool:
        return fake.accepted_count() >= 1

    await wait_for(first_sent, timeout=30, what="the first request")
    await conn.execute("UPDATE campaignd.campaigns SET status = 'paused' WHERE id = $1", campaign_id)

    async def pause_seen() -> bool:
        return "campaign_no_longer_sending" in daemon.log()

    # The edit takes effect when the lane has seen the pause (a pause and resume it never
    # saw leave the campaign running as it was).
    await wait_for(pause_seen, timeout=4, what="the lane to see the pause")
    assert fake.accepted_count() == 1
    await conn.execute(
        "UPDATE campaignd.campaigns SET message = $2, status = 'sending' WHERE id = $1",
        campaign_id,
        {"text": "edited {{name}}"},
    )
    await wait_status(conn, campaign_id, "completed", timeout=60)
    texts = [a.body["message"]["text"] for a in sorted(fake.accepted(), key=lambda a: a.recipient_id)]
    assert texts == ["hello n0", "edited n1", "edited n2"]
    await assert_counters_match(conn, campaign_id)


async def test_a_lane_brought_down_by_a_bug_records_what_it_holds_and_fails_nothing_unsent(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # A bug in the third write of outcomes takes the lane down with sends decided and claims
    # queued. Leaving them in flight made every one of them "in doubt" to the next owner: a
    # sender that does not resend then failed recipients that never left, and sent ones.
    fake.behaviour.latency_seconds = 0.02
    config = daemon_config(
        tmp_path,
        database_url,
        {"sms": {"url": fake.url, "rate_per_second": 200.0, "resend_in_doubt": False}},
        concurrency=4,
    )
    campaign_id = await create_campaign(conn, "sms", 600)
    daemon = daemons(config, env=bug_planted("broken_flush"))

    row = await wait_status(conn, campaign_id, "completed", timeout=90)

    assert "lane_crashed" in daemon.log() and "a bug planted" in daemon.log()
    in_doubt = await conn.fetch(
        "SELECT address FROM campaignd.recipients"
        " WHERE campaign_id = $1 AND state = 'failed' AND error_code = 'in_doubt'",
        campaign_id,
    )
    # Only requests cut off in the air may be in doubt: at most one per send worker, and each
    # of them really reached the provider.
    assert len(in_doubt) <= 4
    assert all(fake.requests_by_address(r["address"]) == 1 for r in in_doubt)
    assert row["sent_count"] + row["failed_count"] == 600 and row["failed_count"] == len(in_doubt)
    assert fake.duplicate_keys() == {}
    await assert_counters_match(conn, campaign_id)
