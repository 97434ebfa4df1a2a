"""Operator commands: pause, resume, cancel, senders, daemons, resume-sender, doctor, healthcheck.

The commands run as the operator runs them, ``python -m campaignd …`` in a subprocess, against
real daemons where the command's point is what a running daemon does next. The doctor's
diagnosis is a pure function over facts, tested here fact by fact without a database.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sys
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from campaignd import operator as ops
from campaignd.cli import build_parser
from campaignd.config import load_settings
from campaignd.fakeprovider import FakeProvider, Rule
from campaignd.operator import (
    CampaignFacts,
    ClaimGroup,
    Counters,
    ErrorCount,
    Finding,
    LaneFacts,
    PausedSenderFacts,
    StateCounts,
    diagnose,
    diagnose_sender,
    health_url,
    transition_refusal,
)
from campaignd.sql import QUERIES
from tests.conftest import (
    add_numbered_recipients,
    assert_counters_match,
    campaign,
    create_campaign,
    daemon_config,
    doubted_then,
    state_counts,
    wait_for,
    wait_status,
    write_config,
)


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def campaignd(config: Path, *args: str) -> Ran:
    """``campaignd ARGS --config CONFIG`` in a subprocess, without blocking this test's loop."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "campaignd",
        *args,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


def ops_config(tmp_path: Path, database_url: str) -> Path:
    return write_config(tmp_path / "ops.toml", {"database": {"url": database_url}})


async def in_flight(conn: asyncpg.Connection, campaign_id: str) -> int:
    return (await state_counts(conn, campaign_id)).get("in_flight", 0)


async def test_a_cancel_that_waits_too_long_for_a_preparation_says_so_and_changes_nothing(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection
) -> None:
    campaign_id = await create_campaign(conn, "sms", 3)
    config = write_config(
        tmp_path / "ops.toml", {"database": {"url": database_url, "lock_timeout_seconds": 0.2}}
    )
    # What a daemon preparing the campaign holds while it checks its recipients.
    preparing = await asyncpg.connect(database_url)
    try:
        await preparing.execute("BEGIN")
        await preparing.execute("SELECT id FROM campaignd.campaigns WHERE id = $1 FOR KEY SHARE", campaign_id)
        ran = await campaignd(config, "cancel", campaign_id)
    finally:
        await preparing.close()

    assert ran.returncode == 1
    assert "did not answer in time" in ran.stderr and "try again" in ran.stderr, ran.stderr
    assert "Traceback" not in ran.stderr
    assert (await campaign(conn, campaign_id))["status"] == "sending"
    assert await state_counts(conn, campaign_id) == {"pending": 3}


async def _prepared_campaign(conn: asyncpg.Connection, recipients: int) -> str:
    campaign_id = await create_campaign(conn, "sms", recipients)
    await conn.execute(
        "UPDATE campaignd.campaigns SET prepared_at = now(), started_at = now(),"
        " total_count = (SELECT count(*) FROM campaignd.recipients WHERE campaign_id = $1) WHERE id = $1",
        campaign_id,
    )
    return campaign_id


async def test_cancel_ends_a_resend_in_doubt_failed_in_doubt_and_says_so(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection
) -> None:
    """With resend_in_doubt, a send in doubt waits as pending (in_doubt) to be resent; the
    cancel recorded that maybe-delivered message as skipped (cancelled)."""
    campaign_id = await _prepared_campaign(conn, 3)
    doubted = await conn.fetchval(
        "UPDATE campaignd.recipients SET error_code = 'in_doubt', error_message = 'interrupted',"
        " next_attempt_at = now() + interval '1 minute'"
        " WHERE id = (SELECT min(id) FROM campaignd.recipients WHERE campaign_id = $1) RETURNING id",
        campaign_id,
    )

    ran = await campaignd(ops_config(tmp_path, database_url), "cancel", campaign_id)

    assert ran.returncode == 0, ran.stderr
    assert f"cancelled campaign {campaign_id}: 2 pending recipients skipped (cancelled)" in ran.stdout
    assert "1 recipient was waiting to be resent after a send in doubt: failed (in_doubt)" in ran.stdout
    row = await conn.fetchrow(
        "SELECT state, error_code, error_message, next_attempt_at FROM campaignd.recipients WHERE id = $1",
        doubted,
    )
    assert tuple(row) == ("failed", "in_doubt", "interrupted", None)
    row = await campaign(conn, campaign_id)
    assert (row["status"], row["failed_count"], row["skipped_count"]) == ("cancelled", 1, 2)
    await assert_counters_match(conn, campaign_id)


@pytest.mark.parametrize("then", ["503", "released"])
async def test_cancel_ends_failed_in_doubt_a_recipient_an_earlier_attempt_may_have_reached(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, then: str
) -> None:
    """A send that timed out may have been delivered; its retry met a 503 (or was given back
    at a stop), which overwrote the error code. The cancel took the row for never sent and
    ended it skipped (cancelled): "not sent", for a message the provider may have."""
    campaign_id = await _prepared_campaign(conn, 3)
    doubted = await doubted_then(conn, campaign_id, then)

    ran = await campaignd(ops_config(tmp_path, database_url), "cancel", campaign_id)

    assert ran.returncode == 0, ran.stderr
    assert "1 recipient was waiting to be resent after a send in doubt: failed (in_doubt)" in ran.stdout
    row = await conn.fetchrow(
        "SELECT state, error_code, error_message, maybe_delivered FROM campaignd.recipients WHERE id = $1",
        doubted,
    )
    assert (row["state"], row["error_code"], row["maybe_delivered"]) == ("failed", "in_doubt", True)
    assert "an earlier attempt may have been delivered" in row["error_message"]
    assert ("(last error: http_503)" in row["error_message"]) is (then == "503")
    row = await campaign(conn, campaign_id)
    assert (row["status"], row["failed_count"], row["skipped_count"]) == ("cancelled", 1, 2)
    await assert_counters_match(conn, campaign_id)


async def test_cancel_reports_the_claims_that_committed_while_it_waited(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection
) -> None:
    """The cancel waits for a claim holding its rows; counted in the cancel's own snapshot,
    taken before that claim committed, the rows it claimed were reported as 0 in flight
    while the lane went on to send them."""
    campaign_id = await _prepared_campaign(conn, 10)
    await conn.execute(
        "UPDATE campaignd.senders SET lease_owner = 'A', lease_epoch = 1,"
        " lease_expires_at = now() + interval '1 hour' WHERE id = 'sms'"
    )
    lane = await asyncpg.connect(database_url)
    try:
        claim = lane.transaction()
        await claim.start()
        claimed = await lane.fetch(QUERIES["claim_recipients"], "sms", "A", 1, campaign_id, 0, 4, 60.0, 1)
        assert len(claimed) == 4
        cancel = asyncio.create_task(campaignd(ops_config(tmp_path, database_url), "cancel", campaign_id))

        async def cancel_waits() -> bool:
            # pg_stat_activity keeps the first 1 kB of a statement: its comment.
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND starts_with(query, left($1, 200))",
                QUERIES["op_cancel_pending"],
            )
            return bool(waiting)

        await wait_for(cancel_waits, timeout=30, what="the cancel waiting for the claim")
        await claim.commit()
        ran = await cancel
    finally:
        await lane.close()

    assert ran.returncode == 0, ran.stderr
    assert "6 pending recipients skipped (cancelled)" in ran.stdout, ran.stdout
    assert "4 recipients are in flight" in ran.stdout, ran.stdout
    assert await state_counts(conn, campaign_id) == {"in_flight": 4, "skipped": 6}


# ------------------------------------------------------------------ with real daemons


async def test_pause_resume_and_cancel_from_the_cli_while_sending(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 100.0}})
    # Big enough that `pause`, a second or more on a busy machine, lands while it is sending.
    first = await create_campaign(conn, "sms", 800, name="paused and resumed")
    daemon = daemons(config)

    async def sent(campaign_id: str, at_least: int) -> bool:
        return (await campaign(conn, campaign_id))["sent_count"] >= at_least

    await wait_for(lambda: sent(first, 50), timeout=30, what="50 sent")
    paused = await campaignd(config, "pause", first)
    assert paused.returncode == 0, paused.stderr
    row = await campaign(conn, first)
    assert (row["status"], row["status_reason"]) == ("paused", "paused by operator")
    # Commands run alongside the waits below: each is a second of interpreter start-up.
    again = asyncio.create_task(campaignd(config, "pause", first))
    await wait_for(lambda: _none(in_flight(conn, first)), timeout=30, what="claims landed or given back")
    await asyncio.sleep(0.5)
    requests = fake.request_count()
    await asyncio.sleep(1.5)
    assert fake.request_count() == requests, "kept sending a paused campaign"
    assert requests < 800
    # Sends that were at the provider when it was paused are recorded, not lost.
    assert (await campaign(conn, first))["sent_count"] == fake.accepted_count()
    await assert_counters_match(conn, first)
    assert (await again).returncode == 1 and "already paused" in again.result().stderr

    resumed = await campaignd(config, "resume", first)
    assert resumed.returncode == 0, resumed.stderr
    assert "warning" not in resumed.stderr
    await wait_status(conn, first, "completed", timeout=60)
    assert fake.accepted_count() == 800 and fake.duplicate_keys() == {}
    await assert_counters_match(conn, first)
    doctor = asyncio.create_task(campaignd(config, "doctor", first))

    # Most of it is cancelled, so its size costs nothing; it leaves the commands time to land.
    second = await create_campaign(
        conn, "sms", [(f"+1666{i:07d}", {"name": "x"}) for i in range(3000)], name="cancelled"
    )
    await wait_for(lambda: sent(second, 50), timeout=30, what="50 sent of the second campaign")

    # The lane's owner, as the operator sees it while the daemon holds it.
    listing = await campaignd(config, "senders", "--json")
    assert listing.returncode == 0, listing.stderr
    (sms,) = json.loads(listing.stdout)
    assert sms["id"] == "sms" and sms["lease_live"] is True and sms["sending_campaigns"] == 1
    assert sms["lease_owner"].endswith(f":{daemon.pid}") and sms["paused_reason"] is None
    # The daemon announced itself: live, holding that lane, configured for that sender.
    listing = await campaignd(config, "daemons", "--json")
    assert listing.returncode == 0, listing.stderr
    (announced,) = json.loads(listing.stdout)
    assert (announced["owner"], announced["live"], announced["lanes"], announced["senders"]) == (
        sms["lease_owner"],
        True,
        1,
        ["sms"],
    )
    table = await campaignd(config, "daemons")
    assert table.returncode == 0 and sms["lease_owner"] in table.stdout, table.stdout

    cancelled = await campaignd(config, "cancel", second)
    assert cancelled.returncode == 0, cancelled.stderr
    match = re.search(r": (\d+) pending recipients skipped \(cancelled\)", cancelled.stdout)
    assert match is not None, cancelled.stdout
    # One snapshot, before the watchdog (which sweeps, and repairs counters) has a say: the
    # command's own statement skipped what it printed and counted it.
    snapshot = await conn.fetchrow(
        "SELECT c.status, c.completed_at, c.skipped_count,"
        " (SELECT count(*) FROM campaignd.recipients r WHERE r.campaign_id = c.id AND r.state = 'skipped')"
        "   AS skipped,"
        " (SELECT count(*) FROM campaignd.recipients r WHERE r.campaign_id = c.id"
        "   AND r.error_message = 'campaign cancelled by operator') AS by_the_command"
        " FROM campaignd.campaigns c WHERE c.id = $1",
        second,
    )
    assert snapshot["status"] == "cancelled" and snapshot["completed_at"] is not None
    assert snapshot["by_the_command"] == int(match[1]) > 0
    assert snapshot["skipped_count"] == snapshot["skipped"]

    await wait_for(lambda: _none(in_flight(conn, second)), timeout=30, what="in-flight sends landed")
    await asyncio.sleep(0.5)
    requests = fake.request_count()
    await asyncio.sleep(1.5)
    assert fake.request_count() == requests, "kept sending a cancelled campaign"

    async def all_final() -> bool:
        return set(await state_counts(conn, second)) <= {"sent", "skipped"}

    # Claims the lane gave back unsent land as pending; the watchdog ends them skipped too.
    await wait_for(all_final, timeout=15, what="every recipient sent or skipped")
    outcomes = {
        (r["state"], r["error_code"]): r["n"]
        for r in await conn.fetch(
            "SELECT state, error_code, count(*) AS n FROM campaignd.recipients"
            " WHERE campaign_id = $1 GROUP BY state, error_code",
            second,
        )
    }
    sent_second = outcomes.pop(("sent", None), 0)
    skipped_cancelled = outcomes.pop(("skipped", "cancelled"), 0)
    assert outcomes == {}, f"only sent and skipped (cancelled) expected, also found {outcomes}"
    assert sent_second + skipped_cancelled == 3000
    assert skipped_cancelled >= int(match[1])
    assert sent_second == len([a for a in fake.accepted() if a.campaign_id == second])
    row = await campaign(conn, second)
    assert row["status"] == "cancelled" and row["skipped_count"] == skipped_cancelled
    await assert_counters_match(conn, second)

    healthy = await doctor
    assert healthy.returncode == 0, healthy.stdout
    assert "campaign completed: 800 sent, 0 failed, 0 skipped" in healthy.stdout
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def _none(count: Any) -> bool:
    return bool(await count == 0)


async def test_resume_sender_resumes_only_the_campaigns_paused_with_it(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    fake.behaviour.all_status = 401
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 200.0}})
    with_sender = await create_campaign(conn, "sms", 100, name="paused with its sender")
    held = await create_campaign(conn, "sms", 100, name="paused with its sender, then by the operator")
    # Sending, but paused before any daemon runs: none of their recipients is sent.
    by_operator = await create_campaign(conn, "sms", 30, name="paused by the operator")
    resumed_early = await create_campaign(conn, "sms", 30, name="resumed before the sender")
    pauses = [campaignd(config, "pause", campaign_id) for campaign_id in (by_operator, resumed_early)]
    for paused in await asyncio.gather(*pauses):
        assert paused.returncode == 0, paused.stderr
    daemon = daemons(config)

    row = await wait_status(conn, with_sender, "paused", timeout=30)
    reason = await conn.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'sms'")
    assert reason is not None and row["status_reason"] == reason
    assert (await wait_status(conn, held, "paused", timeout=30))["status_reason"] == reason

    async def lane_stopped() -> bool:
        owner = await conn.fetchval("SELECT lease_owner FROM campaignd.senders WHERE id = 'sms'")
        return "sender_paused" in daemon.log() and owner is None

    await wait_for(lane_stopped, timeout=30, what="the lane to stop")
    # Held while the token is fixed: was refused as "already paused", and resume-sender then
    # sent it after all.
    hold = await campaignd(config, "pause", held)
    assert hold.returncode == 0, hold.stderr
    assert "stays paused when `campaignd resume-sender sms`" in " ".join(hold.stdout.split())

    doctor, everything = await asyncio.gather(
        campaignd(config, "doctor", with_sender), campaignd(config, "doctor", "--json")
    )
    assert doctor.returncode == 1, doctor.stdout
    assert f"sender sms is paused: {reason}" in " ".join(doctor.stdout.split())
    assert "campaignd resume-sender sms" in doctor.stdout
    assert everything.returncode == 1
    report = json.loads(everything.stdout)
    assert ("sender", "sms") in {(d["kind"], d["id"]) for d in report["diagnoses"]}
    assert {d["id"] for d in report["diagnoses"] if d["kind"] == "campaign"} == {
        with_sender,
        held,
        by_operator,
        resumed_early,
    }

    requests = fake.request_count()
    early = await campaignd(config, "resume", resumed_early)
    assert early.returncode == 0, early.stderr
    assert "sender sms is paused" in early.stderr and "campaignd resume-sender sms" in early.stderr
    assert (await campaign(conn, resumed_early))["status"] == "sending"
    await asyncio.sleep(1.0)
    assert fake.request_count() == requests, "sent on a paused sender"

    fake.behaviour.all_status = None
    resumed = await campaignd(config, "resume-sender", "sms")
    assert resumed.returncode == 0, resumed.stderr
    assert "1 campaign paused with it is sending again" in resumed.stdout and with_sender in resumed.stdout
    for campaign_id in (with_sender, resumed_early):
        await wait_status(conn, campaign_id, "completed", timeout=60)
        await assert_counters_match(conn, campaign_id)
    for campaign_id in (by_operator, held):
        row = await campaign(conn, campaign_id)
        assert (row["status"], row["status_reason"]) == ("paused", "paused by operator")
    assert await conn.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'sms'") is None

    again = await campaignd(config, "resume-sender", "sms")
    assert again.returncode == 0 and "was not paused" in again.stdout
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_a_recipient_whose_answer_pauses_its_sender_at_every_resume_ends_failed(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # A per-recipient error a provider reports as the sender's (401 here; Messenger's code 10
    # with a subcode the tables did not know, before): the sender paused, was resumed, and
    # paused again on the same recipient, sent first after each resume, for ever.
    bad = "+15550000007"
    fake.behaviour.rules[bad] = Rule(401, {"error": {"code": "blocked", "message": "user blocked the page"}})
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 200.0}})
    campaign_id = await create_campaign(conn, "sms", 40)
    daemon = daemons(config)

    async def settled() -> bool:
        row = await campaign(conn, campaign_id)
        if row["status"] == "completed":
            return True
        paused = await conn.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'sms'")
        in_flight = (await state_counts(conn, campaign_id)).get("in_flight", 0)
        return row["status"] == "paused" and paused is not None and in_flight == 0

    resumes = 0
    while True:
        await wait_for(settled, timeout=30, what="the campaign to pause or complete")
        if (await campaign(conn, campaign_id))["status"] == "completed":
            break
        assert resumes < 5, "the same recipient paused its sender at every resume"
        resumption = await ops.resume_sender(conn, "sms")
        assert resumption.campaigns == (campaign_id,)
        resumes += 1

    # Sent first after each resume, spending an attempt each time from the second verdict.
    assert resumes == 3
    row = await conn.fetchrow(
        "SELECT state, error_code, attempts, error_message FROM campaignd.recipients WHERE address = $1", bad
    )
    assert (row["state"], row["error_code"], row["attempts"]) == ("failed", "blocked", 3)
    assert row["error_message"].startswith("gave up after 3 attempts")
    counts = await state_counts(conn, campaign_id)
    assert counts == {"sent": 39, "failed": 1}
    await assert_counters_match(conn, campaign_id)
    assert fake.duplicate_keys() == {}
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_doctor_on_finished_campaigns(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}})
    healthy = await create_campaign(conn, "sms", 20, name="healthy")
    holes = await create_campaign(
        conn,
        "sms",
        [(f"+1777{i:07d}", {"name": "x"}) for i in range(8)] + [(None, {"name": "y"}), ("  ", {"name": "z"})],
        name="holes",
    )
    daemons(config)
    for campaign_id in (healthy, holes):
        await wait_status(conn, campaign_id, "completed", timeout=30)

    ok, with_holes, idle = await asyncio.gather(
        campaignd(config, "doctor", healthy),
        campaignd(config, "doctor", holes, "--json"),
        campaignd(config, "doctor"),
    )
    assert ok.returncode == 0, ok.stdout
    assert "campaign completed: 20 sent, 0 failed, 0 skipped" in ok.stdout and "no problem found" in ok.stdout
    assert with_holes.returncode == 0, with_holes.stdout
    (diagnosis,) = json.loads(with_holes.stdout)["diagnoses"]
    assert {"severity": "info", "message": "2 recipients have no address (skipped: no_address)"} in diagnosis[
        "findings"
    ]
    assert idle.returncode == 0 and "nothing to diagnose" in idle.stdout


# ------------------------------------------------------------------ without a daemon


async def test_commands_refuse_what_they_cannot_do(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    # In this process: a subprocess per case would cost a second each for the same code path,
    # which the tests above already run end to end.
    settings = load_settings(ops_config(tmp_path, database_url))
    draft = await create_campaign(conn, "sms", 3, start=False, name="draft")
    done = await create_campaign(conn, "sms", 3, start=False, name="done")
    await conn.execute("UPDATE campaignd.campaigns SET status = 'completed' WHERE id = $1", done)
    unknown = str(uuid.uuid4())
    unreachable = load_settings(
        write_config(
            tmp_path / "down.toml", {"database": {"url": f"postgresql://127.0.0.1:{_free_port()}/x"}}
        )
    )

    cases: list[tuple[Coroutine[Any, Any, int], str]] = [
        (ops.cmd_pause(settings, unknown), f"no campaign {unknown}"),
        (ops.cmd_resume(settings, draft), "is a draft: nothing is sent until the host sets its status"),
        # A paused draft would be started by the next resume, which the host never asked for.
        (ops.cmd_pause(settings, draft), "is a draft: nothing is sent until the host sets its status"),
        (ops.cmd_pause(settings, done), "is completed: only a sending campaign can be paused"),
        (ops.cmd_cancel(settings, done), "is completed: only a draft or sending or paused campaign"),
        (ops.cmd_resume(settings, done), "is completed: only a paused campaign can be resumed"),
        (ops.cmd_resume_sender(settings, "nosuch"), "no sender nosuch"),
        (ops.cmd_doctor(settings, unknown, as_json=False), f"no campaign {unknown}"),
        (ops.cmd_senders(unreachable, as_json=False), "cannot connect to the database"),
        (ops.cmd_daemons(unreachable, as_json=False), "cannot connect to the database"),
    ]
    for command, message in cases:
        code = await command
        err = capsys.readouterr().err
        assert (code, message in err) == (1, True), err
    with pytest.raises(SystemExit) as usage:
        build_parser().parse_args(["pause", "not-a-uuid"])
    assert usage.value.code == 2

    assert await ops.cmd_cancel(settings, draft) == 0
    assert f"cancelled campaign {draft}: 3 pending recipients skipped (cancelled)" in capsys.readouterr().out
    row = await campaign(conn, draft)
    assert (row["status"], row["skipped_count"], row["total_count"]) == ("cancelled", 3, 3)
    assert await state_counts(conn, draft) == {"skipped": 3}
    await assert_counters_match(conn, draft)
    assert await ops.cmd_cancel(settings, draft) == 1
    assert "already cancelled" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_healthcheck_exit_codes_follow_the_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def sick(_request: web.Request) -> web.Response:
        return web.json_response({"status": "unhealthy"}, status=503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/sick", sick)
    runner = web.AppRunner(app)
    await runner.setup()
    # The commands run in subprocesses (or await), so this loop keeps serving while they wait.
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        # No database anywhere: the URL comes from [health] listen, a wildcard probed on loopback.
        config = write_config(tmp_path / "health.toml", {"health": {"listen": f"0.0.0.0:{port}"}})
        ok, refused = await asyncio.gather(
            campaignd(config, "healthcheck"),
            campaignd(config, "healthcheck", "--url", f"http://127.0.0.1:{_free_port()}/healthz"),
        )
        capsys.readouterr()
        assert await ops.cmd_healthcheck(f"http://127.0.0.1:{port}/sick") == 1
    finally:
        await runner.cleanup()
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"status": "ok"}
    assert refused.returncode == 1 and "Cannot connect" in refused.stderr, refused.stderr
    unhealthy = capsys.readouterr()
    assert "unhealthy" in unhealthy.out and "answered HTTP 503" in unhealthy.err
    disabled = load_settings(write_config(tmp_path / "off.toml", {"health": {"listen": ""}}))
    with pytest.raises(ValueError, match="--url"):
        ops.resolve_health_url(disabled, None)
    assert ops.resolve_health_url(disabled, "http://elsewhere:1/healthz") == "http://elsewhere:1/healthz"


# ------------------------------------------------------------------ pure decisions


def test_transition_refusals_name_the_reason() -> None:
    assert transition_refusal("pause", "c", "sending") is None
    assert "is a draft" in (transition_refusal("pause", "c", "draft") or "")
    assert transition_refusal("resume", "c", "paused") is None
    for status in ("draft", "sending", "paused"):
        assert transition_refusal("cancel", "c", status) is None
    assert transition_refusal("pause", "c", "paused") == "campaign c is already paused"
    # Paused with its sender, which resume-sender undoes: the operator's pause takes it over.
    assert transition_refusal("pause", "c", "paused", held_by_sender=True) is None
    assert transition_refusal("cancel", "c", "cancelled", held_by_sender=True) is not None
    assert transition_refusal("resume", "c", "sending") == "campaign c is already sending"
    assert transition_refusal("cancel", "c", "cancelled") == "campaign c is already cancelled"
    for status in ("completed", "cancelled", "failed"):
        assert f"is {status}" in (transition_refusal("pause", "c", status) or "")
        assert f"is {status}" in (transition_refusal("resume", "c", status) or "")
    assert "is failed" in (transition_refusal("cancel", "c", "failed") or "")
    assert "draft" in (transition_refusal("resume", "c", "draft") or "")


def test_health_url_probes_wildcards_on_loopback() -> None:
    assert health_url("127.0.0.1:9187") == "http://127.0.0.1:9187/healthz"
    assert health_url("0.0.0.0:9187") == "http://127.0.0.1:9187/healthz"
    assert health_url("[::]:9187") == "http://[::1]:9187/healthz"
    assert health_url("[fd00::5]:80") == "http://[fd00::5]:80/healthz"
    assert health_url("campaignd:9187") == "http://campaignd:9187/healthz"
    for unusable in ("", "127.0.0.1:0"):
        with pytest.raises(ValueError, match="--url"):
            health_url(unusable)


NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
LIVE_LANE = LaneFacts(
    sender_id="sms",
    lease_owner="host-a:41",
    lease_epoch=7,
    lease_expires_at=NOW + timedelta(seconds=10),
    lease_live=True,
)


def sending(**changes: Any) -> CampaignFacts:
    """A healthy campaign in the middle of its send; each test changes what it is about."""
    base = CampaignFacts(
        campaign_id="c1",
        name="spring",
        sender=LIVE_LANE,
        now=NOW,
        counters=Counters(total=100, sent=40),
        states=StateCounts(pending=50, in_flight=10, sent=40),
        pending_due=50,
        claims=(ClaimGroup("host-a:41", 7, 10, NOW + timedelta(seconds=5), NOW + timedelta(seconds=9)),),
    )
    return replace(base, **changes)


def problems(findings: list[Finding]) -> list[str]:
    return [f.message for f in findings if f.severity == "problem"]


def infos(findings: list[Finding]) -> list[str]:
    return [f.message for f in findings if f.severity == "info"]


def test_a_healthy_sending_campaign_has_no_problem() -> None:
    findings = diagnose(sending())
    assert problems(findings) == []
    assert infos(findings) == [
        "sender sms's lane is held by host-a:41 (epoch 7) until 2025-03-01 12:00:10 UTC (in 10 s)",
        "10 recipients are in flight, claimed by host-a:41 (epoch 7) until 2025-03-01 12:00:09 UTC (in 9 s)",
    ]


def test_a_paused_sender_is_the_problem_with_its_reason() -> None:
    reason = "provider rejected the sender: 401: invalid token"
    lane = LaneFacts(sender_id="sms", paused_reason=reason, lease_epoch=7)
    findings = diagnose(sending(status="paused", status_reason=reason, sender=lane, claims=()))
    assert problems(findings) == [
        f"sender sms is paused: {reason}; run `campaignd resume-sender sms` once fixed"
    ]
    # Resumed by hand while the sender is still paused: the sender is still the problem.
    assert problems(diagnose(sending(sender=lane, claims=()))) == problems(findings)


def test_a_campaign_left_paused_after_its_sender_was_resumed() -> None:
    findings = diagnose(
        sending(status="paused", status_reason="provider rejected the sender: 403: forbidden", claims=())
    )
    (problem,) = problems(findings)
    assert "has been resumed since" in problem and "campaignd resume c1" in problem


def test_an_operator_pause_is_not_a_problem() -> None:
    findings = diagnose(sending(status="paused", status_reason="paused by operator", claims=()))
    assert problems(findings) == []
    assert "campaign is paused (paused by operator)" in infos(findings)[0]
    assert "campaignd resume c1" in infos(findings)[0]


def test_no_daemon_on_the_lane() -> None:
    never = diagnose(sending(sender=LaneFacts(sender_id="sms"), claims=()))
    assert problems(never) == [
        "no daemon holds sender sms's lane (never taken): is a daemon configured with sender sms running?"
    ]
    expired = LaneFacts(
        sender_id="sms", lease_owner="host-a:41", lease_epoch=3, lease_expires_at=NOW - timedelta(minutes=2)
    )
    (problem,) = problems(diagnose(sending(sender=expired, claims=())))
    assert "the lease of host-a:41 expired at 2025-03-01 11:58:00 UTC (2 min ago)" in problem
    released = LaneFacts(sender_id="sms", lease_epoch=3)
    assert "released by its last holder" in problems(diagnose(sending(sender=released, claims=())))[0]


def test_every_pending_recipient_waiting_on_backoff() -> None:
    facts = sending(
        states=StateCounts(pending=12, sent=88),
        counters=Counters(total=100, sent=88),
        pending_due=0,
        pending_waiting=12,
        next_retry_at=NOW + timedelta(seconds=30),
        last_retry_at=NOW + timedelta(minutes=4),
        claims=(),
    )
    findings = diagnose(facts)
    assert problems(findings) == []
    assert (
        "all 12 pending recipients are waiting on backoff; the next retry is due at 2025-03-01 12:00:30 UTC "
        "(in 30 s), the last at 2025-03-01 12:04:00 UTC (in 4 min)"
    ) in infos(findings)
    some_due = diagnose(replace(facts, pending_due=2, pending_waiting=10))
    assert any(m.startswith("2 recipients are due now and 10 waiting on backoff") for m in infos(some_due))


def test_recipients_without_an_address() -> None:
    few = sending(
        status="completed",
        states=StateCounts(sent=63, skipped=37),
        counters=Counters(total=100, sent=63, skipped=37),
        no_address=37,
        errors=(ErrorCount("skipped", "no_address", 37, "recipient has no address"),),
        claims=(),
    )
    findings = diagnose(few)
    assert problems(findings) == []
    assert "37 recipients have no address (skipped: no_address)" in infos(findings)
    most = replace(
        few,
        states=StateCounts(sent=10, skipped=90),
        counters=Counters(total=100, sent=10, skipped=90),
        no_address=90,
        errors=(ErrorCount("skipped", "no_address", 90),),
    )
    (problem,) = problems(diagnose(most))
    assert problem.startswith("most recipients (90 of 100) have no address (skipped: no_address)")
    unprepared = sending(
        prepared=False, counters=Counters(), states=StateCounts(pending=5), no_address=2, claims=()
    )
    assert "2 recipients have no address (they are skipped as no_address when the campaign starts)" in infos(
        diagnose(unprepared)
    )


def test_a_failed_campaign_says_why() -> None:
    facts = sending(
        status="failed",
        status_reason="no valid recipient: all 3 were skipped or already final",
        states=StateCounts(skipped=3),
        counters=Counters(total=3, skipped=3),
        no_address=3,
        errors=(ErrorCount("skipped", "no_address", 3),),
        claims=(),
    )
    found = problems(diagnose(facts))
    assert "campaign failed: no valid recipient: all 3 were skipped or already final" in found


def test_counters_that_drift_from_recipient_states() -> None:
    (problem,) = problems(diagnose(sending(counters=Counters(total=100, sent=38, skipped=1))))
    assert problem == (
        "counters differ from recipient states: sent_count is 38 but 40 recipients are sent; "
        "skipped_count is 1 but 0 recipients are skipped"
    )
    # total_count is only set when a daemon prepares the campaign.
    assert problems(diagnose(sending(prepared=False, counters=Counters(sent=40)))) == []


def test_errors_by_code_are_a_problem_only_when_most_recipients_fail_with_one() -> None:
    error = ErrorCount("failed", "131026", 412, "message undeliverable")
    some = sending(
        status="completed",
        states=StateCounts(sent=1000, failed=412),
        counters=Counters(total=1412, sent=1000, failed=412),
        errors=(error,),
        claims=(),
    )
    findings = diagnose(some)
    assert problems(findings) == []
    assert "412 recipients failed with code 131026 (message undeliverable)" in infos(findings)
    most = replace(
        some, states=StateCounts(sent=100, failed=412), counters=Counters(total=512, sent=100, failed=412)
    )
    assert problems(diagnose(most)) == [
        "most recipients fail with the same error: 412 of 512 failed with code 131026 (message undeliverable)"
    ]
    retrying = diagnose(sending(errors=(ErrorCount("pending", "http_503", 4, "unavailable"),)))
    assert "4 recipients wait to be retried after http_503 (unavailable)" in infos(retrying)


def test_claims_in_flight_under_an_expired_lease() -> None:
    stale = ClaimGroup("host-b:9", 6, 25, NOW - timedelta(seconds=50), NOW - timedelta(seconds=40))
    (problem,) = problems(diagnose(sending(claims=(stale,))))
    assert problem.startswith(
        "25 recipients are in flight under an expired claim of host-b:9 (epoch 6, expired "
        "2025-03-01 11:59:20 UTC (40 s ago))"
    )


def test_claims_whose_reply_was_lost_under_a_live_lane_are_not_called_abandoned() -> None:
    # The lane renews only the claims it knows of: the rows of a claim whose reply it lost
    # expire while the lane lives. Its daemon did not stop, and the watchdog leaves them alone.
    lost = ClaimGroup("host-a:41", 7, 12, NOW - timedelta(seconds=50), NOW - timedelta(seconds=40))
    findings = diagnose(sending(claims=(lost,)))
    assert problems(findings) == []
    assert (
        "12 recipients are in flight under a claim of host-a:41 (epoch 7, expired 2025-03-01 11:59:20 UTC"
        " (40 s ago)) whose lane is still live: claims whose reply the lane never got, given back unsent"
        " when it has nothing of this campaign left to send or leaves the lane"
    ) in infos(findings)


def test_the_watchdogs_stuck_flag_is_a_problem() -> None:
    facts = sending(stuck_since=NOW - timedelta(minutes=20), stuck_reason="rate limit too low")
    assert problems(diagnose(facts)) == [
        "the watchdog has flagged this campaign stuck since 2025-03-01 11:40:00 UTC (20 min ago): "
        "rate limit too low"
    ]


def test_finished_campaigns() -> None:
    done = sending(
        status="completed", states=StateCounts(sent=100), counters=Counters(total=100, sent=100), claims=()
    )
    assert diagnose(done) == [Finding("info", "campaign completed: 100 sent, 0 failed, 0 skipped")]
    with_work_left = replace(
        done, states=StateCounts(sent=99, pending=1), counters=Counters(total=100, sent=99)
    )
    assert problems(diagnose(with_work_left)) == [
        "campaign is completed but 1 recipient is still pending and 0 in flight"
    ]
    cancelled = sending(
        status="cancelled",
        status_reason="campaign cancelled by operator",
        states=StateCounts(sent=40, skipped=55, pending=5),
        counters=Counters(total=100, sent=40, skipped=55),
        claims=(),
    )
    findings = diagnose(cancelled)
    assert problems(findings) == []
    assert infos(findings)[0] == "campaign was cancelled (campaign cancelled by operator)"
    assert any(
        m.startswith("5 recipients are still pending, given back unsent after the cancel")
        for m in infos(findings)
    )


def test_a_paused_sender_on_its_own() -> None:
    assert diagnose_sender(
        PausedSenderFacts("sms", "provider rejected the sender: 401: bad token", 2, 1)
    ) == [
        Finding(
            "problem",
            "sender sms is paused: provider rejected the sender: 401: bad token; 3 campaigns wait for it; "
            "run `campaignd resume-sender sms` once fixed",
        )
    ]


async def test_a_sender_pause_lifted_before_the_lane_applies_it_stays_lifted(
    conn: asyncpg.Connection,
) -> None:
    """The lane learns of a host's or operator's sender pause at a renewal and pauses the
    sender's campaigns a moment later; `resume-sender` in between must not be undone."""
    campaign_id = await create_campaign(conn, "sms", 3)
    await conn.execute(
        "UPDATE campaignd.senders SET lease_owner = 'host:1', lease_epoch = 1,"
        " lease_expires_at = now() + interval '1 hour' WHERE id = 'sms'"
    )
    lane = ("sms", "host:1", 1)

    # Seen at a renewal, lifted since: nothing paused, nothing written.
    lifted = await conn.fetchrow(QUERIES["pause_sender"], *lane, "host: billing", True, 0)
    assert (lifted["paused_reason"], lifted["campaign_ids"]) == (None, [])
    assert await conn.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'sms'") is None
    assert (await campaign(conn, campaign_id))["status"] == "sending"

    # Still there: its campaigns are paused with it.
    await conn.execute("UPDATE campaignd.senders SET paused_reason = 'host: billing' WHERE id = 'sms'")
    paused = await conn.fetchrow(QUERIES["pause_sender"], *lane, "host: billing", True, 0)
    assert (paused["paused_reason"], paused["campaign_ids"]) == ("host: billing", [uuid.UUID(campaign_id)])

    # Paused with another reason since the lane saw it: still paused, now with that reason.
    await conn.execute("UPDATE campaignd.campaigns SET status = 'sending' WHERE id = $1", campaign_id)
    await conn.execute("UPDATE campaignd.senders SET paused_reason = 'host: audit' WHERE id = 'sms'")
    changed = await conn.fetchrow(QUERIES["pause_sender"], *lane, "host: billing", True, 0)
    assert (changed["paused_reason"], changed["campaign_ids"]) == ("host: audit", [uuid.UUID(campaign_id)])
    assert (await campaign(conn, campaign_id))["status_reason"] == "host: audit"

    # A provider's verdict is the lane's own: written on a sender that was not paused, as the
    # lane last saw it (every pause and resume of the sender counts).
    await conn.execute("UPDATE campaignd.campaigns SET status = 'sending' WHERE id = $1", campaign_id)
    await conn.execute("UPDATE campaignd.senders SET paused_reason = NULL WHERE id = 'sms'")
    seen = await conn.fetchval("SELECT pause_changes FROM campaignd.senders WHERE id = 'sms'")
    assert seen == 2, "paused once and resumed once; the change of reason does not count"
    verdict = await conn.fetchrow(QUERIES["pause_sender"], *lane, "provider: 401", False, seen)
    assert (verdict["paused_reason"], verdict["campaign_ids"]) == ("provider: 401", [uuid.UUID(campaign_id)])
    reason = await conn.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'sms'")
    assert reason == "provider: 401"

    # Resumed since (`resume-sender` while the verdict was written again after a lost reply):
    # the verdict stands down, and the resume stands.
    await conn.execute("UPDATE campaignd.campaigns SET status = 'sending' WHERE id = $1", campaign_id)
    await conn.execute("UPDATE campaignd.senders SET paused_reason = NULL WHERE id = 'sms'")
    again = await conn.fetchrow(QUERIES["pause_sender"], *lane, "provider: 401", False, seen)
    assert (again["paused_reason"], again["campaign_ids"]) == (None, [])
    assert await conn.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'sms'") is None
    assert (await campaign(conn, campaign_id))["status"] == "sending"


async def test_a_provider_verdict_keeps_the_reason_of_a_pause_already_in_place(
    conn: asyncpg.Connection,
) -> None:
    """A host paused the sender while the lane was learning that the provider rejects it: the
    host's reason stays (it is what the operator was told), and the campaigns take it, so that
    `resume-sender` finds them by it."""
    campaign_id = await create_campaign(conn, "sms", 3)
    await conn.execute(
        "UPDATE campaignd.senders SET lease_owner = 'host:1', lease_epoch = 1,"
        " lease_expires_at = now() + interval '1 hour', paused_reason = 'host: billing' WHERE id = 'sms'"
    )

    # The lane saw the sender before the host paused it (pause_changes 0): a pause in place
    # applies whatever the lane saw.
    row = await conn.fetchrow(QUERIES["pause_sender"], "sms", "host:1", 1, "provider: 401", False, 0)

    assert (row["paused_reason"], row["campaign_ids"]) == ("host: billing", [uuid.UUID(campaign_id)])
    sender_reason = await conn.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'sms'")
    assert sender_reason == "host: billing"
    status = await campaign(conn, campaign_id)
    assert (status["status"], status["status_reason"]) == ("paused", "host: billing")
    resumption = await ops.resume_sender(conn, "sms")
    assert (resumption.paused_reason, resumption.campaigns) == ("host: billing", (campaign_id,))


async def test_cancelling_a_campaign_of_many_recipients_takes_bounded_statements(
    conn: asyncpg.Connection,
) -> None:
    # One statement over every pending recipient of 200,000 took longer than this
    # statement_timeout, which stands for the default 30 s against millions: the cancel
    # failed, and could not be made from the CLI at all.
    campaign_id = await create_campaign(conn, "sms", 0)
    await add_numbered_recipients(conn, campaign_id, 200_000)
    await conn.execute("SET statement_timeout = '300ms'")
    try:
        result = await ops.cancel_campaign(conn, campaign_id)
    finally:
        await conn.execute("RESET statement_timeout")

    assert (result.status, result.cancelled, result.in_doubt, result.in_flight) == (
        "cancelled",
        200_000,
        0,
        0,
    )
    assert await state_counts(conn, campaign_id) == {"skipped": 200_000}
    await assert_counters_match(conn, campaign_id)
