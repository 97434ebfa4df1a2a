"""Shared pieces of the benchmarks: the embedded PostgreSQL, the zero-cost HTTP sink, daemon
processes, campaigns, and CPU accounting.

Deliberately independent of tests/ (the benchmarks must keep working whatever the test
fixtures become); the ideas are the same as tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

from _payload import MESSAGE_TEMPLATE, SENDER_ID, address, variables
from campaignd import db
from campaignd.config import DatabaseConfig

BENCH_DIR = Path(__file__).resolve().parent
SINK_ANSWER = '{"id":"x"}'


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers ("64,1000")."""
    return [int(part) for part in text.split(",")]


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL if it does not exit in time; only ever our own child."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    return process.returncode


# ------------------------------------------------------------------ CPU accounting


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process; 0 if it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its live children, and its children that already exited.

    PostgreSQL backends come and go with connections; a reaped backend's time is in the
    postmaster's children_* counters, so a difference of two readings covers the run.
    """
    try:
        parent = psutil.Process(pid)
        times = parent.cpu_times()
        total = float(times.user + times.system + times.children_user + times.children_system)
        children = parent.children(recursive=True)
    except psutil.Error:
        return 0.0
    for child in children:
        with suppress(psutil.Error):
            child_times = child.cpu_times()
            total += float(child_times.user + child_times.system)
    return total


class MachineLoad:
    """CPU the rest of the machine used during a measurement, so a noisy round shows as such.

    Busy time of all CPUs minus what our own processes used, divided by the wall time:
    cores' worth of work by processes not in the benchmark. Steal (the hypervisor running
    someone else) is reported apart: it is time the machine did not have at all.
    """

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._busy, self._steal = self._read()
        self._driver = self._own()

    @staticmethod
    def _read() -> tuple[float, float]:
        times = psutil.cpu_times()
        busy = times.user + times.nice + times.system + times.irq + times.softirq
        return float(busy), float(getattr(times, "steal", 0.0))

    @staticmethod
    def _own() -> float:
        times = os.times()
        return times.user + times.system

    def finish(self, accounted_cpu: float) -> tuple[float, float]:
        """(other processes' cores, stolen cores) since creation; accounted_cpu: our children's CPU."""
        wall = max(1e-9, time.perf_counter() - self._wall)
        busy, steal = self._read()
        ours = accounted_cpu + self._own() - self._driver
        return max(0.0, busy - self._busy - ours) / wall, (steal - self._steal) / wall


async def quiet_moment(max_wait: float, threshold_cores: float = 0.3) -> float:
    """Wait (at most max_wait seconds) until the machine is nearly idle; returns the busy cores seen.

    Other work on a shared machine lands on one side of a raw/campaignd pair more than on
    the other and can flip the verdict; starting each measurement in a quiet moment makes
    that less likely, and the load columns show when it happened anyway.
    """
    deadline = time.monotonic() + max_wait
    psutil.cpu_percent(interval=None)
    while True:
        await asyncio.sleep(0.5)
        busy = float(psutil.cpu_percent(interval=None)) / 100.0 * (os.cpu_count() or 1)
        if busy <= threshold_cores or time.monotonic() >= deadline:
            return busy


def _postgres_role(title: str) -> str:
    # Server processes name themselves "postgres: <role> ..."; client backends put the user
    # and database there instead.
    role = title.removeprefix("postgres: ").strip()
    for known in ("autovacuum", "checkpointer", "background writer", "walwriter", "logical replication"):
        if role.startswith(known):
            return known
    return "client backends" if " " in role else "other"


class PostgresCpu:
    """CPU of a PostgreSQL server by process role, as a difference between two readings.

    A process that exits in between (an autovacuum worker, a closed connection) can only be
    seen in the postmaster's reaped-children counters, so it lands in "exited processes".
    """

    def __init__(self, postmaster_pid: int) -> None:
        self._pid = postmaster_pid
        self._start = self._read()

    def _read(self) -> tuple[float, float, dict[int, tuple[str, float]]]:
        try:
            parent = psutil.Process(self._pid)
            times = parent.cpu_times()
            children = parent.children(recursive=True)
        except psutil.Error:
            return 0.0, 0.0, {}
        live: dict[int, tuple[str, float]] = {}
        for child in children:
            with suppress(psutil.Error):
                child_times = child.cpu_times()
                title = " ".join(child.cmdline())
                live[child.pid] = (_postgres_role(title), float(child_times.user + child_times.system))
        own = float(times.user + times.system)
        reaped = float(times.children_user + times.children_system)
        return own, reaped, live

    def finish(self) -> dict[str, float]:
        own_end, reaped_end, live_end = self._read()
        own_start, reaped_start, live_start = self._start
        by_role: dict[str, float] = {"postmaster": own_end - own_start, "exited processes": 0.0}
        by_role["exited processes"] = reaped_end - reaped_start
        for pid, (role, cpu) in live_end.items():
            before = live_start.get(pid, (role, 0.0))[1]
            by_role[role] = by_role.get(role, 0.0) + cpu - before
        # A process alive at the start and gone at the end is in the reaped counters with all
        # its time, including what it had used before the start.
        for pid, (_, cpu) in live_start.items():
            if pid not in live_end:
                by_role["exited processes"] -= cpu
        return {role: max(0.0, cpu) for role, cpu in by_role.items()}


# ------------------------------------------------------------------ PostgreSQL


@dataclass
class Postgres:
    url: str
    server: Any
    durability: dict[str, str]
    version: str

    @property
    def pid(self) -> int:
        pid: int = self.server.get_pid()
        return pid


DURABILITY_SETTINGS = (
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "wal_sync_method",
    "shared_buffers",
    "max_wal_size",
    "checkpoint_timeout",
)


@contextmanager
def embedded_postgres(root: Path) -> Iterator[Postgres]:
    from campaignd.embedded import start_embedded

    url, server = start_embedded(root / "pgdata", cleanup="delete")
    try:
        yield Postgres(url, server, {}, "")
    finally:
        server.cleanup()


async def refresh_settings(postgres: Postgres) -> None:
    connection = await asyncpg.connect(postgres.url)
    try:
        postgres.version = await connection.fetchval("SHOW server_version")
        postgres.durability = {
            name: await connection.fetchval(f"SHOW {name}") for name in DURABILITY_SETTINGS
        }
    finally:
        await connection.close()


async def set_synchronous_commit(postgres: Postgres, value: str) -> None:
    connection = await asyncpg.connect(postgres.url)
    try:
        await connection.execute(f"ALTER SYSTEM SET synchronous_commit = {value}")
        await connection.execute("SELECT pg_reload_conf()")
    finally:
        await connection.close()
    # pg_reload_conf() only signals the postmaster; new sessions see the value once it is read.
    for _ in range(50):
        await refresh_settings(postgres)
        if postgres.durability["synchronous_commit"] == value:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"synchronous_commit did not become {value}")


async def create_template(postgres: Postgres, name: str) -> None:
    from campaignd.schema import migrate

    admin = await asyncpg.connect(postgres.url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    connection = await db.connect(DatabaseConfig(url=with_database(postgres.url, name)))  # type: ignore[arg-type]
    try:
        await migrate(connection)
    finally:
        await connection.close()


async def clone_database(postgres: Postgres, template: str, name: str) -> str:
    admin = await asyncpg.connect(postgres.url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        await admin.close()
    return with_database(postgres.url, name)


async def drop_database(postgres: Postgres, name: str) -> None:
    admin = await asyncpg.connect(postgres.url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


async def register_sender(
    connection: asyncpg.Connection,
    rate_per_second: float = 1_000_000.0,
    burst: int = 100_000,
    *,
    sender_id: str = SENDER_ID,
) -> None:
    """The benchmark sender's row, as `campaignd migrate` would write it (rate limits out of the way)."""
    await connection.execute(
        "INSERT INTO campaignd.senders (id, provider, rate_per_second, burst) VALUES ($1, 'http', $2, $3)"
        " ON CONFLICT (id) DO NOTHING",
        sender_id,
        rate_per_second,
        burst,
    )


async def create_campaign(
    connection: asyncpg.Connection, recipients: int, *, sender_id: str = SENDER_ID
) -> str:
    """As a host does it: sender row, draft campaign, COPY recipients; started separately."""
    await register_sender(connection, sender_id=sender_id)
    async with connection.transaction():
        campaign_id = await connection.fetchval(
            "INSERT INTO campaignd.campaigns (name, sender_id, message)"
            " VALUES ('bench', $1, $2) RETURNING id",
            sender_id,
            MESSAGE_TEMPLATE,
        )
        await connection.copy_records_to_table(
            "recipients",
            schema_name="campaignd",
            columns=["campaign_id", "address", "variables"],
            records=((campaign_id, address(i), variables(i)) for i in range(recipients)),
        )
    return str(campaign_id)


async def ready_campaign(connection: asyncpg.Connection, recipients: int) -> str:
    """A campaign of ``recipients`` in a database cloned from the template, not yet started,
    with statistics and a checkpoint taken so that every measurement begins in the same state
    (and pays the same full-page writes). Autovacuum may still analyze the table mid-run, as
    it would in production."""
    from campaignd.schema import migrate

    # The package may have gained a migration since the template was made (it is edited while
    # benchmarks run); the daemon refuses an old schema.
    await migrate(connection)
    campaign_id = await create_campaign(connection, recipients)
    await connection.execute("ANALYZE campaignd.recipients")
    await connection.execute("CHECKPOINT")
    return campaign_id


class ActivitySampler:
    """A poor man's pg_stat_statements (which the embedded server lacks): the statements
    PostgreSQL is running, sampled from pg_stat_activity, named after campaignd's QUERIES.

    A statement seen in many samples is where the server's time goes; its wait event says
    whether that time is CPU ("cpu") or waiting (IO:WalSync is the commit's fsync).
    """

    def __init__(self) -> None:
        from campaignd.sql import QUERIES

        self._names = {sql.strip(): name for name, sql in QUERIES.items()}
        self.samples = 0
        self.seen: dict[str, int] = {}

    def _name(self, query: str) -> str:
        query = query.strip()
        name = self._names.get(query)
        if name is None:
            # pg_stat_activity keeps the first track_activity_query_size bytes only.
            name = next((n for sql, n in self._names.items() if sql.startswith(query)), None)
        return name or " ".join(query.split())[:60]

    async def sample(self, connection: asyncpg.Connection) -> None:
        rows = await connection.fetch(
            "SELECT query, wait_event_type, wait_event FROM pg_stat_activity"
            " WHERE state = 'active' AND pid <> pg_backend_pid() AND datname = current_database()"
        )
        self.samples += 1
        for row in rows:
            wait = f"{row['wait_event_type']}:{row['wait_event']}" if row["wait_event_type"] else "cpu"
            key = f"{self._name(row['query'])} [{wait}]"
            self.seen[key] = self.seen.get(key, 0) + 1

    def top(self, count: int = 5) -> list[tuple[str, float]]:
        """(statement [wait], share of samples in which a backend was running it)."""
        ranked = sorted(self.seen.items(), key=lambda item: -item[1])[:count]
        return [(key, hits / max(1, self.samples)) for key, hits in ranked]


def daemon_events(log_path: Path) -> dict[str, int]:
    """Warnings and errors a daemon logged, by event; in-doubt recoveries by recipients resent."""
    import json

    events: dict[str, int] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or record.get("level") not in ("warning", "error", "critical"):
            continue
        event = str(record.get("event"))
        events[event] = events.get(event, 0) + 1
        if event == "in_doubt_recovered":
            events["recipients resent as in doubt"] = events.get("recipients resent as in doubt", 0) + int(
                record.get("resent", 0) or 0
            )
    return events


# ------------------------------------------------------------------ the sink


@dataclass
class Sink:
    url: str
    kind: str
    processes: list[subprocess.Popen[bytes]]
    status_url: str | None = None

    def cpu(self) -> float:
        return sum(tree_cpu(process.pid) for process in self.processes)

    def requests(self) -> int | None:
        """Requests nginx has served so far (this reading included); None without nginx."""
        if self.status_url is None:
            return None
        import urllib.request

        with urllib.request.urlopen(self.status_url, timeout=5) as response:
            text = response.read().decode()
        # "Active connections: 1 \nserver accepts handled requests\n 5 5 17 \n..."
        return int(text.splitlines()[2].split()[2])


NGINX_CONF = """\
{load_modules}worker_processes {workers};
daemon off;
master_process on;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    # Reconnections would be a cost of the sink, not of the client under test.
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port}{reuseport} backlog=4096;
        location / {{
            default_type application/json;
{answer_directives}
        }}
        # Requests served, to tell resent messages from first sends.
        location = /nginx_status {{
            stub_status;
        }}
    }}
}}
"""


def _wait_listening(port: int, processes: list[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"sink exited with code {process.returncode}")
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"sink did not listen on 127.0.0.1:{port} within {timeout}s")


NGINX_ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")


def _nginx_answer(latency: float) -> tuple[str, str]:
    """(load_module lines, location directives) answering 200 {"id":"x"}, after `latency` s."""
    if latency <= 0:
        return "", f"            return 200 '{SINK_ANSWER}';"
    if not NGINX_ECHO_MODULE.exists():
        raise RuntimeError(
            "a sink with latency needs nginx's echo module (apt-get install libnginx-mod-http-echo)"
        )
    # echo_sleep is a timer in the event loop, not a blocked worker: one worker holds
    # thousands of sleeping requests at once.
    return (
        f"load_module {NGINX_ECHO_MODULE};\n",
        f"            echo_sleep {latency};\n            echo -n '{SINK_ANSWER}';",
    )


@contextmanager
def zero_cost_sink(
    root: Path, kind: str = "auto", *, latency: float = 0.0, workers: int = 1
) -> Iterator[Sink]:
    """nginx answering 200 {"id":"x"} on loopback; a multi-process aiohttp sink without nginx
    (or with kind="aiohttp").

    latency > 0 makes every answer wait that long (a provider's round trip); with nginx it needs
    the echo module, and kind="auto" falls back to the aiohttp sink without it. workers > 1
    shares the port between that many nginx workers (SO_REUSEPORT), so that one core's worth
    of sink cannot be what a benchmark measures.
    """
    port = free_port()
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if kind == "nginx" and not nginx:
        raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
    if kind == "aiohttp" or (kind == "auto" and latency > 0 and not NGINX_ECHO_MODULE.exists()):
        nginx = None
    processes: list[subprocess.Popen[bytes]] = []
    try:
        if nginx:
            root.mkdir(parents=True, exist_ok=True)
            # nginx's workers drop to "nobody" when started as root; they only need to read.
            root.chmod(0o755)
            conf = root / "nginx.conf"
            load_modules, answer_directives = _nginx_answer(latency)
            conf.write_text(
                NGINX_CONF.format(
                    root=root,
                    port=port,
                    workers=workers,
                    reuseport=" reuseport" if workers > 1 else "",
                    load_modules=load_modules,
                    answer_directives=answer_directives,
                )
            )
            log = (root / "nginx.out").open("wb")
            processes.append(
                subprocess.Popen([nginx, "-p", str(root), "-c", str(conf)], stdout=log, stderr=log)
            )
            description = f"nginx ({workers} worker{'s' if workers > 1 else ''}, access_log off"
            description += f", echo_sleep {latency * 1000:g} ms)" if latency > 0 else ")"
        else:
            workers = max(workers, os.cpu_count() or 1)
            for _ in range(workers):
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(BENCH_DIR / "_sink.py"),
                            "--port",
                            str(port),
                            "--latency",
                            str(latency),
                        ],
                        stdout=subprocess.DEVNULL,
                    )
                )
            description = f"aiohttp sink, {workers} processes (not nginx: the sink may be the bottleneck)"
            if latency > 0:
                description += f", answering after {latency * 1000:g} ms"
        _wait_listening(port, processes)
        status_url = f"http://127.0.0.1:{port}/nginx_status" if nginx else None
        yield Sink(f"http://127.0.0.1:{port}/v1/messages", description, processes, status_url)
    finally:
        for process in processes:
            stop_process(process, timeout=5)


# ------------------------------------------------------------------ the daemon


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_daemon_config(
    path: Path,
    *,
    database_url: str,
    sink_url: str,
    concurrency: int = 64,
    batch_size: int = 500,
    poll_seconds: float = 1.0,
    log_level: str = "warning",
    rate_per_second: float = 1_000_000.0,
    burst: int = 100_000,
    pool_size: int | None = None,
    sender_id: str = SENDER_ID,
) -> Path:
    database: dict[str, Any] = {"url": database_url}
    if pool_size is not None:
        database["pool_size"] = pool_size
    sections: dict[str, dict[str, Any]] = {
        "database": database,
        "dispatch": {
            "concurrency": concurrency,
            "batch_size": batch_size,
            "poll_seconds": poll_seconds,
            "drain_seconds": 5.0,
        },
        "log": {"format": "json", "level": log_level},
        # The health/metrics server would listen on a fixed port that another daemon on a
        # shared machine may hold; an unscraped server costs nothing anyway.
        "health": {"listen": ""},
        # Rate limits out of the way by default: the bucket must never be what is measured,
        # except by the rate-accuracy benchmark.
        f"senders.{sender_id}": {
            "provider": "http",
            "url": sink_url,
            "rate_per_second": rate_per_second,
            "burst": burst,
            "timeout_seconds": 10.0,
        },
    }
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class Daemon:
    """One ``python -m campaignd run`` subprocess, its output in a file."""

    def __init__(self, config: Path, log_path: Path, *, prefix: Sequence[str] = ()) -> None:
        """``prefix``: a command to run it under (valgrind, say)."""
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "campaignd", "run", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def cpu(self) -> float:
        return process_cpu(self.pid)

    def stop(self, timeout: float = 20.0) -> int | None:
        code = stop_process(self.process, timeout=timeout)
        self._log.close()
        return code

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


async def wait_daemon_listening(
    connection: asyncpg.Connection, daemon: Daemon, limit: float = 30.0, *, listeners: int = 1
) -> None:
    """Ready once its NOTIFY listener is connected: from then on a start wakes it at once.

    ``listeners``: how many daemons on this database must be listening (the others started
    before this one)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise RuntimeError(
                f"campaignd exited with code {daemon.process.returncode}:\n{daemon.log_tail()}"
            )
        listening = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'campaignd' AND datname = current_database()"
            " AND query ILIKE 'LISTEN%'"
        )
        if listening >= listeners:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"campaignd did not start listening within {limit}s:\n{daemon.log_tail()}")


def new_workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


@contextmanager
def bench_workdir(prefix: str, *, keep: bool) -> Iterator[Path]:
    """A temporary folder for one run (configs, logs, data), removed afterwards unless kept."""
    path = new_workdir(prefix)
    try:
        yield path
    finally:
        if keep:
            print(f"work files kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
