"""Throughput: one ``campaignd run`` against a zero-cost local sink, next to a raw aiohttp blast.

    python bench/throughput.py [--recipients N] [--concurrency C] [--rounds R] [--batch-size B]
                               [--quiet-wait S] [--analyze-at FRACTION] [--also-async]
                               [--sink auto|nginx|aiohttp] [--profile PATH [--profile-native]]
                               [--count-wakeups]

The goal (project issue on performance): durable msgs/s >= 0.75 x a raw aiohttp blast (same
body size, same concurrency, no database) to the same sink, measured in the same run.
Absolute figures move between machines, so each round measures both, one after the other
(raw first in odd rounds, campaignd first in even ones), and the verdict is the median of
the per-round ratios. The sink is nginx when installed
(``apt-get install nginx-light``), else a multi-process aiohttp sink, named in the output.

Everything runs on 127.0.0.1, in temporary directories, and stops by itself: each
measurement has a time limit, and the sink, the daemons and PostgreSQL are stopped on the
way out. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from _common import (
    BENCH_DIR,
    ActivitySampler,
    Daemon,
    MachineLoad,
    Postgres,
    PostgresCpu,
    Sink,
    clone_database,
    create_template,
    daemon_events,
    drop_database,
    embedded_postgres,
    new_workdir,
    quiet_moment,
    ready_campaign,
    refresh_settings,
    set_synchronous_commit,
    tree_cpu,
    wait_daemon_listening,
    write_daemon_config,
    zero_cost_sink,
)
from _schedstat import cpu_wait_seconds
from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.logs import configure_logging

TARGET_RATIO = 0.75
TEMPLATE_DB = "bench_template"
POLL_SECONDS = 0.05


@dataclass
class RawResult:
    rate: float
    elapsed: float
    errors: int
    client_cpu: float
    # Time the client was runnable and waited for a CPU another process held.
    client_cpu_wait: float
    sink_cpu: float
    others_cores: float
    steal_cores: float
    sink_requests: int | None


@dataclass
class CampaignResult:
    rate: float
    elapsed: float
    db_elapsed: float
    first_sent_after: float
    steady_rate: float
    sent: int
    status: str
    wal_bytes: int
    pg_cpu: float
    pg_cpu_by_role: dict[str, float]
    pg_activity: list[tuple[str, float]]
    daemon_cpu: float
    daemon_cpu_wait: float
    sink_cpu: float
    others_cores: float
    steal_cores: float
    sink_requests: int | None
    daemon_events: dict[str, int]
    exit_code: int | None


@dataclass
class Round:
    raw: RawResult
    campaignd: CampaignResult

    @property
    def ratio(self) -> float:
        return self.campaignd.rate / self.raw.rate


# ------------------------------------------------------------------ measurements


async def measure_raw(
    sink: Sink,
    count: int,
    concurrency: int,
    time_limit: float,
    *,
    profile: Path | None = None,
    native: bool = False,
    processes: int = 1,
) -> RawResult:
    """The blast in its own process; processes > 1 splits count and concurrency between that
    many blasts started together, to find the sink's ceiling above what one client reaches."""
    sink_before, requests_before = sink.cpu(), sink.requests()
    load = MachineLoad()
    children_before = children_cpu()
    campaign_id = str(uuid.uuid4())
    blasts = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH_DIR / "_blast.py"),
            "--url",
            sink.url,
            "--count",
            str(count // processes + (1 if index < count % processes else 0)),
            "--concurrency",
            str(concurrency // processes),
            "--campaign-id",
            campaign_id,
            stdout=asyncio.subprocess.PIPE,
        )
        for index in range(processes)
    ]
    profiler = Profiler(blasts[0].pid, profile, native=native) if profile else None
    try:
        outputs = await asyncio.wait_for(
            asyncio.gather(*(blast.communicate() for blast in blasts)), timeout=time_limit
        )
    except TimeoutError:
        for blast in blasts:
            if blast.returncode is None:
                blast.kill()
            await blast.wait()
        raise RuntimeError(f"the raw blast did not finish within {time_limit:.0f}s") from None
    finally:
        if profiler:
            profiler.stop()
    for blast in blasts:
        if blast.returncode != 0:
            raise RuntimeError(f"the raw blast exited with code {blast.returncode}")
    results = [json.loads(stdout.decode().strip().splitlines()[-1]) for stdout, _ in outputs]
    # Blasts started together each time their own work: the slowest one is when all was sent.
    elapsed = max(result["elapsed"] for result in results)
    sink_cpu = sink.cpu() - sink_before
    requests_after = sink.requests()
    # The whole blast process (start-up included) is ours for the load figure.
    others, steal = load.finish(children_cpu() - children_before + sink_cpu)
    return RawResult(
        rate=count / elapsed,
        elapsed=elapsed,
        errors=sum(result["errors"] for result in results),
        client_cpu=sum(result["cpu_seconds"] for result in results),
        client_cpu_wait=sum(result["cpu_wait_seconds"] for result in results),
        sink_cpu=sink_cpu,
        others_cores=others,
        steal_cores=steal,
        sink_requests=served(requests_before, requests_after),
    )


class Profiler:
    """py-spy attached to a process for the length of one measurement (idle time excluded)."""

    def __init__(self, pid: int, output: Path, *, native: bool = False) -> None:
        self.output = output
        # Blocking sampling (the default): --nonblocking disturbs less but tears stacks apart,
        # which makes the attribution to libraries unreliable. Profiled runs are not scored.
        command = ["py-spy", "record", "--format", "raw", "--rate", "200", "-o", str(output)]
        command += ["--pid", str(pid)] + (["--native"] if native else [])
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        # py-spy writes its output on SIGINT, as after Ctrl-C; if the target exited first it
        # has written it already.
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            output, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
        if b"Wrote" not in output:
            print(f"py-spy wrote no profile:\n{output.decode(errors='replace')}", file=sys.stderr)


async def measure_campaignd(
    postgres: Postgres,
    sink: Sink,
    *,
    count: int,
    concurrency: int,
    batch_size: int,
    workdir: Path,
    name: str,
    time_limit: float,
    profile: Path | None = None,
    native: bool = False,
    quiet_wait: float = 0.0,
    analyze_at: float | None = None,
    pool_size: int | None = None,
) -> CampaignResult:
    url = await clone_database(postgres, TEMPLATE_DB, name)
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    daemon: Daemon | None = None
    try:
        # --analyze-at makes an ANALYZE mid-run certain.
        campaign_id = await ready_campaign(connection, count)

        config = write_daemon_config(
            workdir / f"{name}.toml",
            database_url=url,
            sink_url=sink.url,
            concurrency=concurrency,
            batch_size=batch_size,
            pool_size=pool_size,
        )
        daemon = Daemon(config, workdir / f"{name}.log")
        await wait_daemon_listening(connection, daemon)
        await quiet_moment(quiet_wait)

        profiler = Profiler(daemon.pid, profile, native=native) if profile else None
        if profiler:
            # Let py-spy attach before the work starts.
            await asyncio.sleep(1.0)
        wal_before = await connection.fetchval("SELECT pg_current_wal_lsn()")
        pg_before, daemon_before, sink_before = tree_cpu(postgres.pid), daemon.cpu(), sink.cpu()
        daemon_wait_before = cpu_wait_seconds(daemon.pid)
        pg_roles = PostgresCpu(postgres.pid)
        requests_before = sink.requests()
        load = MachineLoad()

        started_db = await connection.fetchval(
            "UPDATE campaignd.campaigns SET status = 'sending' WHERE id = $1 RETURNING clock_timestamp()",
            campaign_id,
        )
        started = time.perf_counter()
        deadline = started + time_limit
        activity = ActivitySampler()
        analyzed = analyze_at is None
        while True:
            await activity.sample(connection)
            row = await connection.fetchrow(
                "SELECT status, sent_count FROM campaignd.campaigns WHERE id = $1", campaign_id
            )
            assert row is not None
            status = row["status"]
            if not analyzed and analyze_at is not None and row["sent_count"] >= analyze_at * count:
                # What autovacuum does on its own once enough rows changed: in a campaign longer
                # than this benchmark's it is all but certain to happen mid-send.
                await connection.execute("ANALYZE campaignd.recipients")
                analyzed = True
            if status not in ("sending", "draft"):
                break
            if not daemon.alive():
                raise RuntimeError(f"campaignd exited during the run:\n{daemon.log_tail()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"campaign not completed within {time_limit:.0f}s:\n{daemon.log_tail()}")
            await asyncio.sleep(POLL_SECONDS)
        elapsed = time.perf_counter() - started

        pg_cpu = tree_cpu(postgres.pid) - pg_before
        pg_cpu_by_role = pg_roles.finish()
        daemon_cpu = daemon.cpu() - daemon_before
        daemon_cpu_wait = cpu_wait_seconds(daemon.pid) - daemon_wait_before
        sink_cpu = sink.cpu() - sink_before
        others, steal = load.finish(pg_cpu + daemon_cpu + sink_cpu)
        requests = served(requests_before, sink.requests())
        wal_bytes = int(
            await connection.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)", wal_before)
        )
        if profiler:
            profiler.stop()

        row = await connection.fetchrow(
            "SELECT c.sent_count, c.completed_at,"
            " (SELECT min(sent_at) FROM campaignd.recipients WHERE campaign_id = c.id) AS first_sent,"
            " (SELECT max(sent_at) FROM campaignd.recipients WHERE campaign_id = c.id) AS last_sent"
            " FROM campaignd.campaigns c WHERE c.id = $1",
            campaign_id,
        )
        assert row is not None
        exit_code = daemon.stop()
        events = daemon_events(daemon.log_path)
        daemon = None
        sent = int(row["sent_count"])
        span = (row["last_sent"] - row["first_sent"]).total_seconds() if row["first_sent"] else 0.0
        return CampaignResult(
            rate=count / elapsed,
            elapsed=elapsed,
            db_elapsed=(row["completed_at"] - started_db).total_seconds() if row["completed_at"] else 0.0,
            first_sent_after=(row["first_sent"] - started_db).total_seconds() if row["first_sent"] else 0.0,
            # sent_at is the commit time of each outcome batch: the rate between the first and
            # the last batch leaves out start-up (claim, prepare) and the completion check.
            steady_rate=(sent / span) if span > 0 else 0.0,
            sent=sent,
            status=status,
            wal_bytes=wal_bytes,
            pg_cpu=pg_cpu,
            pg_cpu_by_role=pg_cpu_by_role,
            pg_activity=activity.top(),
            daemon_cpu=daemon_cpu,
            daemon_cpu_wait=daemon_cpu_wait,
            sink_cpu=sink_cpu,
            others_cores=others,
            steal_cores=steal,
            sink_requests=requests,
            daemon_events=events,
            exit_code=exit_code,
        )
    finally:
        if daemon is not None:
            daemon.stop()
        await connection.close()
        await drop_database(postgres, name)


async def check_sink(sink: Sink) -> None:
    async with aiohttp.ClientSession() as session, session.post(sink.url, data=b"{}") as response:
        body = await response.read()
    if response.status != 200 or b'"id"' not in body:
        raise RuntimeError(f"the sink answered {response.status} {body[:100]!r}")


# ------------------------------------------------------------------ reporting


def served(before: int | None, after: int | None) -> int | None:
    """Requests the sink served between two stub_status readings, the second reading excluded."""
    if before is None or after is None:
        return None
    return after - before - 1


def children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


def per_message(requests: int | None, count: int) -> str:
    return "n/a" if requests is None else f"{requests / count:.3f}"


def window_shares(cpu: float, cpu_wait: float, elapsed: float) -> str:
    """Where a process's timed window went: on a CPU, runnable but waiting for one (another
    process held it), and idle (waiting for the sink or the database). A process that is
    never idle is bound by its CPU per message alone."""
    idle = max(0.0, elapsed - cpu - cpu_wait)
    return " / ".join(f"{100 * part / elapsed:5.1f}%" for part in (cpu, cpu_wait, idle))


def per_k(seconds: float, count: int) -> float:
    return 1000.0 * seconds / count


def print_rounds(title: str, rounds: list[Round], count: int) -> float:
    print(f"\n{title}")
    print(
        f"{'round':>5} {'raw msg/s':>10} {'campaignd msg/s':>16} {'ratio':>6} {'steady msg/s':>13}"
        f" {'1st send s':>10} {'other load raw/cd':>18} {'steal raw/cd':>13} {'sink req/msg raw/cd':>20}"
    )
    for index, item in enumerate(rounds, 1):
        raw, run = item.raw, item.campaignd
        print(
            f"{index:>5} {raw.rate:>10,.0f} {run.rate:>16,.0f} {item.ratio:>6.3f}"
            f" {run.steady_rate:>13,.0f} {run.first_sent_after:>10.2f}"
            f" {raw.others_cores:>8.2f}/{run.others_cores:<4.2f} cores"
            f" {raw.steal_cores:>7.2f}/{run.steal_cores:<4.2f}"
            f" {per_message(raw.sink_requests, count):>12}/{per_message(run.sink_requests, count)}"
        )
    print(
        f"\n{'round':>5} {'WAL B/msg':>10} {'PG cpu s/1k':>12} {'daemon cpu s/1k':>16}"
        f" {'raw client cpu s/1k':>20} {'cpu ratio':>10} {'sink cpu s/1k raw/cd':>21}"
    )
    for index, item in enumerate(rounds, 1):
        raw, run = item.raw, item.campaignd
        print(
            f"{index:>5} {run.wal_bytes / count:>10,.0f} {per_k(run.pg_cpu, count):>12.3f}"
            f" {per_k(run.daemon_cpu, count):>16.3f} {per_k(raw.client_cpu, count):>20.3f}"
            f" {raw.client_cpu / run.daemon_cpu:>10.3f}"
            f" {per_k(raw.sink_cpu, count):>13.3f}/{per_k(run.sink_cpu, count):.3f}"
        )
    print(
        f"\n{'round':>5} {'raw client: on a CPU / waiting for one / idle':>46}"
        f" {'campaignd: on a CPU / waiting for one / idle':>46}   (shares of each one's timed window)"
    )
    for index, item in enumerate(rounds, 1):
        raw, run = item.raw, item.campaignd
        print(
            f"{index:>5} {window_shares(raw.client_cpu, raw.client_cpu_wait, raw.elapsed):>46}"
            f" {window_shares(run.daemon_cpu, run.daemon_cpu_wait, run.elapsed):>46}"
        )
    for index, item in enumerate(rounds, 1):
        roles = sorted(item.campaignd.pg_cpu_by_role.items(), key=lambda pair: -pair[1])
        shown = ", ".join(
            f"{role} {per_k(cpu, count):.3f}" for role, cpu in roles if per_k(cpu, count) >= 0.0005
        )
        print(f"{index:>5} PG cpu s/1k by process: {shown}")
        busiest = ", ".join(f"{key} {100 * share:.0f}%" for key, share in item.campaignd.pg_activity)
        print(f"{'':>5} PG busiest statements (share of 50 ms samples): {busiest}")
        if item.campaignd.daemon_events:
            logged = ", ".join(f"{event} x{n}" for event, n in sorted(item.campaignd.daemon_events.items()))
            print(f"{'':>5} daemon warnings/errors: {logged}")
    ratios = [item.ratio for item in rounds]
    median = statistics.median(ratios)
    verdict = "MET" if median >= TARGET_RATIO else "NOT MET"
    print(
        f"median ratio {median:.3f} vs target {TARGET_RATIO} -> {verdict}"
        f"   (median raw {statistics.median(r.raw.rate for r in rounds):,.0f} msg/s,"
        f" median campaignd {statistics.median(r.campaignd.rate for r in rounds):,.0f} msg/s)"
    )
    print(
        f"median WAL {statistics.median(r.campaignd.wal_bytes / count for r in rounds):,.0f} B/msg,"
        f" median PG CPU {statistics.median(per_k(r.campaignd.pg_cpu, count) for r in rounds):.3f} s/1k msgs,"
        f" median daemon CPU {statistics.median(per_k(r.campaignd.daemon_cpu, count) for r in rounds):.3f}"
        f" s/1k msgs, median raw client CPU"
        f" {statistics.median(per_k(r.raw.client_cpu, count) for r in rounds):.3f} s/1k msgs"
    )
    for index, item in enumerate(rounds, 1):
        run = item.campaignd
        problems = []
        if item.raw.errors:
            problems.append(f"raw blast had {item.raw.errors} errors")
        if run.sent != count or run.status != "completed":
            problems.append(f"campaign ended {run.status} with {run.sent}/{count} sent")
        if run.exit_code != 0:
            problems.append(f"campaignd exited with code {run.exit_code} on SIGTERM")
        if problems:
            print(f"  round {index}: " + "; ".join(problems))
    return median


def source_revision() -> str:
    """The commit measured, and whether the package had uncommitted edits at the time."""
    repository = BENCH_DIR.parent

    def git(*arguments: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(repository), *arguments], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--", "daemon")
    return f"{commit}{' + uncommitted changes in daemon/' if dirty else ''} ({repository})"


def describe_machine(postgres: Postgres, sink: Sink, args: argparse.Namespace) -> None:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    durability = ", ".join(f"{k}={v}" for k, v in postgres.durability.items())
    print("campaignd throughput benchmark")
    print(f"  date          {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"  machine       {os.cpu_count()} CPUs, {model}, load average {os.getloadavg()[0]:.2f} (1 min)")
    print(f"  python        {platform.python_version()} ({sys.executable})")
    print(f"  campaignd     {source_revision()}")
    print(f"  postgresql    {postgres.version} (embedded), data on {postgres.server.pgdata}")
    print(f"  durability    {durability}")
    print(f"  sink          {sink.kind} at {sink.url}")
    print(
        f"  workload      N={args.recipients} recipients/messages per measurement, C={args.concurrency}"
        f" concurrent requests, batch_size={args.batch_size}, rounds={args.rounds}"
    )
    if args.analyze_at is not None:
        print(
            f"  analyze       ANALYZE campaignd.recipients once {args.analyze_at:.0%} of the campaign is sent"
        )
    print(
        "  campaignd     one `python -m campaignd run` (uvloop), rate 1,000,000/s burst 100,000, log warning;"
    )
    print(
        "                timed from the UPDATE to status='sending' until status='completed'"
        " (polled every 50 ms)"
    )
    print(
        "  raw           aiohttp ClientSession(TCPConnector(limit=C)) in its own uvloop process, no database"
    )


async def begin_run(title: str, postgres: Postgres, sink: Sink) -> None:
    """What every script measuring with this module's functions does first: a checked sink,
    the migrated template campaignd's databases are cloned from, and the common header."""
    # The schema migration logs at info; only the benchmark's own figures belong on stdout.
    configure_logging("console", "warning")
    await refresh_settings(postgres)
    await check_sink(sink)
    await create_template(postgres, TEMPLATE_DB)
    durability = ", ".join(f"{k}={v}" for k, v in postgres.durability.items())
    print(title)
    print(f"  date          {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"  machine       {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (1 min)")
    print(f"  python        {platform.python_version()} ({sys.executable})")
    print(f"  campaignd     {source_revision()}")
    print(f"  postgresql    {postgres.version} (embedded); {durability}")
    print(f"  sink          {sink.kind} at {sink.url}")


async def rounds_of(
    postgres: Postgres, sink: Sink, args: argparse.Namespace, workdir: Path, label: str
) -> list[Round]:
    time_limit = 60.0 + args.recipients / 500
    results: list[Round] = []
    for index in range(1, args.rounds + 1):
        # Alternately first (ABBA): a machine that slows down as a round goes on would otherwise
        # always charge campaignd, which would always run second.
        raw_first = index % 2 == 1
        if raw_first:
            await quiet_moment(args.quiet_wait)
            raw = await measure_raw(sink, args.recipients, args.concurrency, time_limit)
        run = await measure_campaignd(
            postgres,
            sink,
            count=args.recipients,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            workdir=workdir,
            name=f"bench_{label}_{index}",
            time_limit=time_limit,
            quiet_wait=args.quiet_wait,
            analyze_at=args.analyze_at,
        )
        if not raw_first:
            await quiet_moment(args.quiet_wait)
            raw = await measure_raw(sink, args.recipients, args.concurrency, time_limit)
        results.append(Round(raw, run))
        print(
            f"  [{label} round {index}, {'raw' if raw_first else 'campaignd'} first]"
            f" raw {raw.rate:,.0f} msg/s ({raw.elapsed:.2f} s),"
            f" campaignd {run.rate:,.0f} msg/s ({run.elapsed:.2f} s; {run.db_elapsed:.2f} s by the"
            f" database's clock), ratio {run.rate / raw.rate:.3f}",
            flush=True,
        )
    return results


async def main_async(args: argparse.Namespace, postgres: Postgres, sink: Sink, workdir: Path) -> None:
    # The schema migration logs at info; only the benchmark's own figures belong on stdout.
    configure_logging("console", "warning")
    await refresh_settings(postgres)
    await check_sink(sink)
    await create_template(postgres, TEMPLATE_DB)
    describe_machine(postgres, sink, args)
    print(flush=True)

    durable = await rounds_of(postgres, sink, args, workdir, "durable")
    durable_settings = ", ".join(
        f"{k}={postgres.durability[k]}" for k in ("fsync", "synchronous_commit", "full_page_writes")
    )
    print_rounds(
        f"DURABLE ({durable_settings}), N={args.recipients}, C={args.concurrency}",
        durable,
        args.recipients,
    )

    if args.also_async:
        await set_synchronous_commit(postgres, "off")
        relaxed = await rounds_of(postgres, sink, args, workdir, "async")
        print_rounds(
            f"synchronous_commit=off (NOT the durable figure; fsync still on), N={args.recipients},"
            f" C={args.concurrency}",
            relaxed,
            args.recipients,
        )
        await set_synchronous_commit(postgres, "on")

    if args.profile:
        from _profile import compare, parse, report

        # Extra, unscored runs: py-spy's sampling costs the profiled process some time.
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        raw_profile = args.profile.with_name(args.profile.stem + ".raw" + args.profile.suffix)
        raw, run = await unscored_pair(
            args,
            postgres,
            sink,
            workdir,
            "bench_profile",
            raw_profile=raw_profile,
            profile=args.profile,
            native=args.profile_native,
        )
        # CPU seconds per 1,000 messages are milliseconds per message.
        daemon_ms = per_k(run.daemon_cpu, args.recipients)
        raw_ms = per_k(raw.client_cpu, args.recipients)
        daemon_profile, raw_profile_data = parse(args.profile), parse(raw_profile)
        native = " --native" if args.profile_native else ""
        print(f"\nPROFILE of one campaignd run (py-spy{native}, unscored: {run.rate:,.0f} msg/s)")
        print(f"stacks in {args.profile}")
        print(report(daemon_profile, daemon_ms))
        print(f"\nPROFILE of one raw blast (py-spy{native}, unscored: {raw.rate:,.0f} msg/s)")
        print(f"stacks in {raw_profile}")
        print(report(raw_profile_data, raw_ms))
        print("\nPROFILES SIDE BY SIDE (share of samples x measured CPU per message)")
        print(compare(daemon_profile, daemon_ms, raw_profile_data, raw_ms))
    if args.count_wakeups:
        await count_wakeups(args, postgres, sink, workdir)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} (1 min)")


async def unscored_pair(
    args: argparse.Namespace,
    postgres: Postgres,
    sink: Sink,
    workdir: Path,
    name: str,
    *,
    raw_profile: Path | None = None,
    profile: Path | None = None,
    native: bool = False,
) -> tuple[RawResult, CampaignResult]:
    """One more raw blast and campaignd run after the rounds, for a profile or a count: not
    scored, since watching a process slows it."""
    time_limit = 120.0 + args.recipients / 200
    raw = await measure_raw(
        sink, args.recipients, args.concurrency, time_limit, profile=raw_profile, native=native
    )
    run = await measure_campaignd(
        postgres,
        sink,
        count=args.recipients,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        workdir=workdir,
        name=name,
        time_limit=time_limit,
        profile=profile,
        native=native,
    )
    return raw, run


async def count_wakeups(args: argparse.Namespace, postgres: Postgres, sink: Sink, workdir: Path) -> None:
    """One more raw blast and campaignd run, unscored, each counting what it asks of its
    event loop (bench/_wakeups): whether campaignd's extra cost per message is more
    scheduling (wakeups, tasks, timers) or more work per wakeup."""
    prefix = workdir / "wakeups"
    # Both subprocesses inherit the environment: the counting loop is theirs, not this driver's.
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "BENCH_COUNT_WAKEUPS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(BENCH_DIR / "_wakeups"), saved["PYTHONPATH"]])
    )
    os.environ["BENCH_COUNT_WAKEUPS"] = str(prefix)
    try:
        await unscored_pair(args, postgres, sink, workdir, "bench_wakeups")
        raw_counts = read_wakeups(prefix, "_blast.py")
        daemon_counts = read_wakeups(prefix, "campaignd")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    print(f"\nEVENT-LOOP REQUESTS PER MESSAGE (one unscored run each, N={args.recipients:,})")
    print(wakeups_table(daemon_counts, raw_counts, args.recipients))


def read_wakeups(prefix: Path, program: str) -> dict[str, int]:
    """The counts written by the one process whose command line names ``program``."""
    for path in prefix.parent.glob(prefix.name + ".*"):
        written = json.loads(path.read_text())
        if any(program in argument for argument in written["argv"][:2]):
            path.unlink()
            return {str(name): int(count) for name, count in written["counts"].items()}
    raise RuntimeError(f"no event-loop counts were written by {program} (is uvloop.run its entry?)")


def wakeups_table(daemon: dict[str, int], raw: dict[str, int], count: int) -> str:
    """Per message, side by side: totals by kind, then every callback seen at least once
    per hundred messages on either side."""
    lines = [f"{'':60} {'campaignd':>10} {'raw':>8}"]
    for kind in ("call_soon", "timer", "task"):
        ours = sum(n for name, n in daemon.items() if name.startswith(kind + " "))
        theirs = sum(n for name, n in raw.items() if name.startswith(kind + " "))
        lines.append(f"{'all ' + kind:60} {ours / count:10.3f} {theirs / count:8.3f}")
    names = sorted(set(daemon) | set(raw), key=lambda name: -max(daemon.get(name, 0), raw.get(name, 0)))
    for name in names:
        ours, theirs = daemon.get(name, 0) / count, raw.get(name, 0) / count
        if max(ours, theirs) >= 0.01:
            lines.append(f"  {name[:58]:58} {ours:10.3f} {theirs:8.3f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=50_000, help="messages per measurement (50000)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent requests (64)")
    parser.add_argument("--rounds", type=int, default=3, help="raw/campaignd pairs (3)")
    parser.add_argument("--batch-size", type=int, default=1000, help="campaignd [dispatch] batch_size (1000)")
    parser.add_argument(
        "--also-async", action="store_true", help="then repeat the rounds with synchronous_commit=off"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before each measurement, wait up to this many seconds for the machine to be idle (10)",
    )
    parser.add_argument(
        "--analyze-at",
        type=float,
        metavar="FRACTION",
        help="ANALYZE the recipients table once this fraction is sent, as autovacuum would mid-campaign",
    )
    parser.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument(
        "--sink", choices=["auto", "nginx", "aiohttp"], default="auto", help="auto: nginx when installed"
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and daemon logs")
    parser.add_argument(
        "--profile", type=Path, help="then profile one extra campaignd run with py-spy into this file"
    )
    parser.add_argument(
        "--count-wakeups",
        action="store_true",
        help="then count, in one extra raw blast and campaignd run, the event-loop callbacks,"
        " timers and tasks per message",
    )
    args = parser.parse_args()
    if args.recipients < 1 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--recipients, --concurrency and --rounds must be at least 1")
    workdir = new_workdir("campaignd-bench-")
    try:
        with embedded_postgres(workdir) as postgres, zero_cost_sink(workdir / "sink", args.sink) as sink:
            asyncio.run(main_async(args, postgres, sink, workdir))
    finally:
        if args.keep_workdir:
            print(f"work files (configs, daemon logs, nginx config) kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
