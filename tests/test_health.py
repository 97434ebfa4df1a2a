"""Liveness, readiness, metrics and systemd notifications, from the outside."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client import CollectorRegistry, generate_latest

from campaignd import db, metrics
from campaignd.config import DatabaseConfig, load_settings
from campaignd.daemon import Daemon
from campaignd.dispatch import Shutdown
from campaignd.fakeprovider import FakeProvider, Rule
from campaignd.health import HealthServer, Heartbeats
from campaignd.metrics import DurationHistogram
from campaignd.schema import migrate
from tests.conftest import create_campaign, daemon_config, wait_for, wait_status


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_send_duration_histogram_exposes_cumulative_buckets_count_and_sum() -> None:
    registry = CollectorRegistry()
    histogram = DurationHistogram("t_seconds", "help", "sender_id", (0.01, 0.1, 1.0), registry)
    series = histogram.labels("sms")
    for seconds in (0.001, 0.01, 0.05, 0.5, 7.0):
        series.observe(seconds)
    assert histogram.labels("sms") is series
    text = generate_latest(registry).decode()
    # A bucket counts the observations at or below its bound (0.01 is in le="0.01").
    assert 't_seconds_bucket{le="0.01",sender_id="sms"} 2.0' in text
    assert 't_seconds_bucket{le="0.1",sender_id="sms"} 3.0' in text
    assert 't_seconds_bucket{le="1.0",sender_id="sms"} 4.0' in text
    assert 't_seconds_bucket{le="+Inf",sender_id="sms"} 5.0' in text
    assert 't_seconds_count{sender_id="sms"} 5.0' in text
    assert 't_seconds_sum{sender_id="sms"} 7.561' in text
    assert "# TYPE t_seconds histogram" in text


def test_the_throughput_window_forgets_old_batches_even_when_nobody_reads_the_rate() -> None:
    # Only systemd's STATUS= line reads the rate: in docker or a terminal, every outcome batch
    # of a long-running daemon used to stay in memory.
    window = metrics.Throughput(window_seconds=60.0)
    for second in range(10_000):
        window.add(5, now=float(second))
    assert len(window) == 61
    assert window.rate(now=9_999.0) == 5 * 61 / 60


def test_heartbeats_name_the_loop_that_stopped_ticking() -> None:
    clock = FakeClock()
    beats = Heartbeats(clock)
    beats.register("dispatcher", 30)
    beats.register("watchdog", 60)
    clock.now += 45
    assert beats.problems() == ["dispatcher loop has not ticked for 45s (allowed 30s)"]
    beats.beat("dispatcher")
    assert beats.problems() == []


async def test_healthz_turns_503_when_a_loop_is_wedged_and_readyz_reports_why() -> None:
    clock = FakeClock()
    beats = Heartbeats(clock)
    beats.register("dispatcher", 30)
    reasons: list[str | None] = [None]

    async def readiness() -> str | None:
        return reasons[0]

    server = HealthServer("127.0.0.1", 0, beats, readiness)
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert (await get(base + "/healthz"))[0] == 200
        clock.now += 31  # the dispatcher loop is stuck
        status, body = await get(base + "/healthz")
        assert status == 503
        assert json.loads(body) == {
            "status": "unhealthy",
            "problems": ["dispatcher loop has not ticked for 31s (allowed 30s)"],
        }
        assert (await get(base + "/readyz"))[0] == 200
        reasons[0] = "database unreachable (ConnectionRefusedError)"
        status, body = await get(base + "/readyz")
        assert status == 503 and "database unreachable" in body
        status, body = await get(base + "/metrics")
        assert status == 200 and "campaignd_sends_in_flight" in body
        # Nothing changes state: no other methods, no other paths.
        async with aiohttp.ClientSession() as session, session.post(base + "/healthz") as response:
            assert response.status == 405
        assert (await get(base + "/admin"))[0] == 404
    finally:
        await server.stop()


async def test_daemon_serves_health_readiness_and_metrics_and_reports_a_database_outage(
    tmp_path: Path, own_server: tuple[str, Any], fake: FakeProvider, daemons: Any
) -> None:
    url, server = own_server
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    await migrate(connection)
    good = [(f"+1555000{i:04d}", {"name": "x"}) for i in range(48)]
    fake.behaviour.rules["+15550000000"] = Rule(400, {"error": {"code": "bad_number"}})
    campaign_id = await create_campaign(connection, "sms", [*good, (None, {"name": "x"})])
    port = free_port()
    config = daemon_config(tmp_path, url, {"sms": {"url": fake.url}}, health_listen=f"127.0.0.1:{port}")
    daemon = daemons(config)
    base = f"http://127.0.0.1:{port}"
    await wait_status(connection, campaign_id, "completed", timeout=60)
    await connection.close()

    async def ready() -> bool:
        try:
            return (await get(base + "/readyz"))[0] == 200
        except aiohttp.ClientError:
            return False

    await wait_for(ready, timeout=30, what="readyz")
    assert (await get(base + "/healthz"))[0] == 200
    # The Docker HEALTHCHECK command, against this running daemon, through its config file.
    probe = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "campaignd", "healthcheck", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == {"status": "ok"}
    _, text = await get(base + "/metrics")
    assert 'campaignd_messages_total{error_class="none",outcome="sent",sender_id="sms"} 47.0' in text
    assert (
        'campaignd_messages_total{error_class="recipient_permanent",outcome="failed",sender_id="sms"} 1.0'
        in text
    )
    assert 'campaignd_send_duration_seconds_count{sender_id="sms"} 48.0' in text
    assert "campaignd_event_loop_lag_seconds" in text
    assert "campaignd_watchdog_runs_total" in text
    # Anyone who can reach the port can send a malformed request: aiohttp logs it with a
    # traceback, through the standard library, which used to bypass the JSON log.
    await asyncio.to_thread(
        _send_raw, port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"
    )

    async def logged() -> bool:
        return "aiohttp.server" in daemon.log()

    await wait_for(logged, timeout=30, what="aiohttp's line about the malformed request")

    await asyncio.to_thread(server.stop)

    async def not_ready() -> bool:
        status, body = await get(base + "/readyz")
        return status == 503 and "database" in body

    await wait_for(not_ready, timeout=30, what="readyz to report the outage")
    # Liveness stays green: restarting the daemon would not bring the database back.
    assert (await get(base + "/healthz"))[0] == 200
    await asyncio.to_thread(server.start)
    await wait_for(ready, timeout=60, what="readyz after the database returned")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    for line in daemon.log().splitlines():
        assert isinstance(json.loads(line), dict), line


def _send_raw(port: int, request: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(request)
        raw.recv(4096)


async def test_readiness_names_a_database_error_that_is_not_an_outage(tmp_path: Path) -> None:
    # A login refused when the pool opens a connection (a rotated password) is no outage, but
    # the daemon cannot work either: a probe gets 503 with the reason, not a 500 and a
    # traceback in the log every few seconds.
    settings = load_settings(
        daemon_config(tmp_path, "postgresql://campaignd@127.0.0.1:1/campaignd", {"sms": {"url": "http://x"}})
    )
    daemon = Daemon(settings, Shutdown(settings.dispatch.drain_seconds))

    class RefusingPool:
        def acquire(self) -> Any:
            raise asyncpg.InvalidAuthorizationSpecificationError("password authentication failed")

    daemon._pool = RefusingPool()  # type: ignore[assignment]
    assert await daemon._readiness() == "database login refused (InvalidAuthorizationSpecificationError)"

    class BrokenPool:
        def acquire(self) -> Any:
            raise asyncpg.DataError("a server error")

    daemon._pool = BrokenPool()  # type: ignore[assignment]
    assert await daemon._readiness() == "database error (DataError)"


async def test_sd_notify_ready_watchdog_status_then_stopping(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(0.2)
    await create_campaign(conn, "sms", 20)
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}})
    daemon = daemons(config, env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"})
    messages: list[str] = []

    def receive_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                messages.append(listener.recv(4096).decode())
            except TimeoutError:
                continue

    try:
        await asyncio.to_thread(receive_for, 4.0)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        await asyncio.to_thread(receive_for, 0.5)
    finally:
        listener.close()

    kinds = [m.split("\n")[0].split("=")[0] for m in messages]
    assert kinds[0] == "READY", messages
    assert "WATCHDOG" in kinds, messages
    assert kinds.count("WATCHDOG") >= 3, "WATCHDOG=1 every half WatchdogSec"
    assert kinds[-1] == "STOPPING", messages
    assert kinds.index("READY") < kinds.index("WATCHDOG") < kinds.index("STOPPING")
    status = next(m for m in messages if m.startswith("READY=1"))
    assert "STATUS=" in status and "campaigns active" in status and "msg/s" in status
