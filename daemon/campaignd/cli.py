"""Command line: ``campaignd run | migrate | status | demo``, the operator commands
``pause | resume | cancel | senders | daemons | resume-sender | doctor | healthcheck``, and
``campaign create`` (a campaign from a CSV file).

Exit codes: 0 success, 1 runtime failure (database unreachable, schema not migrated),
2 bad configuration or usage (systemd's RestartPreventExitStatus=2 stops a crash loop).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

import structlog

from campaignd.config import ConfigError, Settings, load_settings
from campaignd.logs import configure_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    # Accepted before or after the subcommand. SUPPRESS keeps a subcommand's parser from
    # resetting a value given before it (absent options are read with getattr).
    common = _Parser(add_help=False)
    common.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help="TOML config file (default: $CAMPAIGND_CONFIG)"
    )
    common.add_argument(
        "--log-format", choices=["json", "console"], default=argparse.SUPPRESS, help="overrides [log] format"
    )
    common.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=argparse.SUPPRESS,
        help="overrides [log] level",
    )

    parser = _Parser(
        prog="campaignd",
        description="Campaign-dispatch daemon: sends campaigns stored in PostgreSQL exactly once "
        "per recipient.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser(
        "run",
        parents=[common],
        help="run the daemon",
        description="Lease SENDING campaigns, send them under the senders' rate limits, record every "
        "outcome. SIGTERM drains in-flight sends within [dispatch] drain_seconds and exits 0.",
    )
    commands.add_parser(
        "migrate",
        parents=[common],
        help="create or upgrade the campaignd schema",
        description="Create or upgrade schema 'campaignd' (idempotent, safe to run concurrently), "
        "and register the configured senders so hosts can reference them.",
    )
    status = commands.add_parser(
        "status",
        parents=[common],
        help="show campaigns and their progress",
        description="A table of the latest campaigns (or one campaign) with counts and progress.",
    )
    status.add_argument(
        "campaign_id", nargs="?", type=uuid.UUID, help="one campaign (default: the latest 50)"
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="send a demo campaign on an embedded PostgreSQL and a local fake provider",
        description="Starts an embedded PostgreSQL and a fake provider, creates a campaign of a few "
        "thousand recipients (a few of them bad, some provider errors), sends it with a live progress "
        "display, and prints a summary. Needs no input; finishes by itself.",
    )
    demo.add_argument("--recipients", type=int, default=3000, help="campaign size (default 3000)")
    demo.add_argument("--rate", type=float, default=250.0, help="sender rate limit, msgs/s (default 250)")
    demo.add_argument(
        "--data-dir", type=Path, help="embedded PostgreSQL data directory (default: a new temp dir)"
    )
    _add_operator_commands(commands, common)
    _add_campaign_commands(commands, common)
    return parser


# A campaign's cap is bounded as a sender's rate is (config, and schema 8).
MAX_RATE_PER_SECOND = 1_000_000


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= MAX_RATE_PER_SECOND:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be a number above 0, at most {MAX_RATE_PER_SECOND:,}"
        )
    return value


def _add_campaign_commands(commands: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    campaign = commands.add_parser(
        "campaign", parents=[common], help="create campaigns", description="Create campaigns."
    )
    actions = campaign.add_subparsers(dest="campaign_command", required=True, parser_class=_Parser)
    create = actions.add_parser(
        "create",
        parents=[common],
        help="create a campaign from a JSON message and a CSV of recipients",
        description="Create a campaign (a draft, or sending with --start) from a message file and a "
        "recipients CSV, loaded with COPY in one transaction: on any error nothing is created. The CSV "
        "has a header row with an 'address' column; every other column is a variable for the "
        "message's {{placeholders}}. Bad rows are reported with their line numbers. Exit 0 created, "
        "1 database problem or unknown sender, 2 bad input (nothing created).",
    )
    create.add_argument("--sender", required=True, help="the sender's id ([senders.<id>])")
    create.add_argument(
        "--message", required=True, type=Path, help="JSON file: the message template, a JSON object"
    )
    create.add_argument(
        "--recipients", required=True, type=Path, help="CSV file: header row with 'address' + variables"
    )
    create.add_argument("--start", action="store_true", help="start sending at once (default: a draft)")
    create.add_argument("--name", help="the campaign's name (default: the CSV file's name)")
    create.add_argument(
        "--rate", type=_positive_float, help="cap this campaign at R msgs/s, beneath the sender's rate"
    )
    create.add_argument(
        "--on-bad-row",
        choices=["skip", "reject"],
        default="skip",
        help="skip: load the other rows and report the bad ones (default); reject: create nothing, exit 2",
    )


def _add_operator_commands(commands: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    for name, help_line, description in (
        (
            "pause",
            "pause a sending campaign",
            "Set the campaign to paused ('paused by operator'). Daemons stop claiming its recipients at "
            "once; sends already at the provider finish and are recorded. Exit 1 if it does not exist or "
            "is not sending (a draft is refused: nothing is sent until the host starts it).",
        ),
        (
            "resume",
            "resume a paused campaign",
            "Set a paused campaign back to sending; the daemons are woken at once and continue where it "
            "stopped. Warns when its sender is paused, as nothing is sent until `resume-sender`.",
        ),
        (
            "cancel",
            "cancel a campaign: its pending recipients end skipped (cancelled)",
            "In one transaction: the campaign (draft, sending or paused) ends cancelled and its pending "
            "recipients end skipped with error code 'cancelled'. Recipients already in flight are "
            "recorded by the daemon sending them. Prints how many recipients were cancelled.",
        ),
    ):
        command = commands.add_parser(name, parents=[common], help=help_line, description=description)
        command.add_argument("campaign_id", type=uuid.UUID, help="the campaign's id")
    senders = commands.add_parser(
        "senders",
        parents=[common],
        help="list the senders: lanes, owners, rates, paused reasons",
        description="Every registered sender with its rate, the daemon holding its lane (and whether "
        "that lease is live), why it is paused, and how many campaigns it is sending.",
    )
    senders.add_argument("--json", action="store_true", help="print JSON instead of a table")
    daemons = commands.add_parser(
        "daemons",
        parents=[common],
        help="list the daemons serving this database, and the lanes each holds",
        description="Every daemon that announced itself (every [dispatch] rebalance_seconds): live or "
        "gone, the lanes it holds now, the senders it is configured for, when it started and was last "
        "seen. Replicas hand lanes to one that serves two fewer.",
    )
    daemons.add_argument("--json", action="store_true", help="print JSON instead of a table")
    resume_sender = commands.add_parser(
        "resume-sender",
        parents=[common],
        help="clear a sender's pause and resume the campaigns it paused",
        description="Clear the sender's paused_reason (set when the provider rejected it) and set back "
        "to sending the campaigns that were paused because of it; campaigns an operator or host paused "
        "stay paused. One transaction. Exit 1 if the sender does not exist.",
    )
    resume_sender.add_argument("sender_id", help="the sender's id ([senders.<id>])")
    doctor = commands.add_parser(
        "doctor",
        parents=[common],
        help="explain why a campaign is not progressing",
        description="Explain in plain words why a campaign is (not) progressing: its sender's pause and "
        "lane, recipients without addresses, errors by code, retries waiting on backoff, claims in "
        "flight, counters. Without CAMPAIGN_ID: every sending or paused campaign and every paused "
        "sender. Exit 1 when a problem is found.",
    )
    doctor.add_argument(
        "campaign_id", nargs="?", type=uuid.UUID, help="one campaign (default: all sending or paused)"
    )
    doctor.add_argument("--json", action="store_true", help="print JSON instead of text")
    healthcheck = commands.add_parser(
        "healthcheck",
        parents=[common],
        help="probe a running daemon's /healthz (for HEALTHCHECK and probes)",
        description="GET the daemon's /healthz within 3 s and print the answer. Exit 0 on HTTP 200, 1 "
        "otherwise (connection refused included). Needs no database.",
    )
    healthcheck.add_argument(
        "--url", help="the URL to probe (default: http://<[health] listen>/healthz, wildcards as loopback)"
    )


def _settings(args: argparse.Namespace) -> Settings:
    log = {
        field: value
        for field, value in (
            ("format", getattr(args, "log_format", None)),
            ("level", getattr(args, "log_level", None)),
        )
        if value
    }
    return load_settings(getattr(args, "config", None), {"log": log} if log else None)


def tune_garbage_collector() -> None:
    """Fewer, cheaper collections for a long-running process that allocates per message.

    Everything alive at start-up (modules, config, classes) lives as long as the process:
    freezing it keeps full collections from rescanning it. A larger first-generation threshold
    collects young objects in fewer, larger sweeps; the profile showed the collector at 11% of
    the daemon's CPU with the defaults.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


def _run_async(factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(factory())
    result: int = uvloop.run(factory())
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from campaignd.demo import run_demo

        return _run_async(lambda: run_demo(args))
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"campaignd: {exc}", file=sys.stderr)
        # Docker reserves a health check's exit code 2: a misconfigured probe is "unhealthy".
        return EXIT_FAILURE if args.command == "healthcheck" else EXIT_CONFIG
    configure_logging(settings.log.format, settings.log.level)
    handlers: dict[str, Callable[[Settings, argparse.Namespace], Awaitable[int]]] = {
        "run": _cmd_run,
        "migrate": _cmd_migrate,
        "status": _cmd_status,
        "pause": _cmd_pause,
        "resume": _cmd_resume,
        "cancel": _cmd_cancel,
        "senders": _cmd_senders,
        "daemons": _cmd_daemons,
        "resume-sender": _cmd_resume_sender,
        "doctor": _cmd_doctor,
        "healthcheck": _cmd_healthcheck,
        "campaign": _cmd_campaign,
    }
    handler = handlers[args.command]
    try:
        return _run_async(lambda: handler(settings, args))  # type: ignore[arg-type,return-value]
    except Exception as exc:
        from campaignd.db import client_configuration_problem, is_transient_db_error

        problem = client_configuration_problem(exc, settings.database)
        if problem is not None:
            print(f"campaignd: invalid configuration:\n  database.url: {problem}", file=sys.stderr)
            return EXIT_FAILURE if args.command == "healthcheck" else EXIT_CONFIG
        if _refused_by_the_database(exc):
            # A login, a database or a privilege the server refuses (`run` ended in a
            # traceback): the operator's to fix, in the words the operator commands use.
            from campaignd.db import url_redactor

            reason = f"{type(exc).__name__}: {url_redactor(settings.database)(str(exc))}"
            print(f"campaignd: cannot connect to the database: {reason}", file=sys.stderr)
            return EXIT_FAILURE
        if not is_transient_db_error(exc):
            raise
        print(f"campaignd: the database is unreachable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return EXIT_FAILURE


def _refused_by_the_database(exc: BaseException) -> bool:
    import asyncpg

    from campaignd.db import LOGIN_REFUSED

    return isinstance(
        exc,
        (
            LOGIN_REFUSED,  # a wrong password, NOLOGIN
            asyncpg.exceptions.InvalidCatalogNameError,  # no such database
            asyncpg.exceptions.InsufficientPrivilegeError,
        ),
    )


async def _cmd_run(settings: Settings, _args: argparse.Namespace) -> int:
    from campaignd.daemon import (
        Daemon,
        DaemonFailed,
        StartupError,
        end_an_overrunning_stop,
        shutdown_on_signals,
    )
    from campaignd.dispatch import Shutdown
    from campaignd.schema import SchemaNotReady

    if not settings.senders:
        print(
            "campaignd: invalid configuration:\n  senders: at least one [senders.<id>] is required to run",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    shutdown = Shutdown(settings.dispatch.drain_seconds)
    daemon = Daemon(settings, shutdown)
    tune_garbage_collector()
    overrun = asyncio.create_task(end_an_overrunning_stop(shutdown), name="stop-overrun")
    with shutdown_on_signals(shutdown):
        try:
            await daemon.run()
        except SchemaNotReady as exc:
            structlog.get_logger("campaignd").error("schema_not_ready", reason=str(exc))
            return EXIT_FAILURE
        except StartupError as exc:
            structlog.get_logger("campaignd").error("startup_failed", reason=str(exc))
            return EXIT_FAILURE
        except DaemonFailed:
            return EXIT_FAILURE  # logged as daemon_failed, with the failure, before the drain
        finally:
            overrun.cancel()
    return EXIT_OK


async def _cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    import asyncpg

    from campaignd import db
    from campaignd.daemon import sync_senders
    from campaignd.schema import MigrationLockTimeout, migrate

    log = structlog.get_logger("campaignd")
    connection = await db.connect(settings.database)
    try:
        applied = await migrate(connection)
        await sync_senders(connection, settings)
    except MigrationLockTimeout as exc:
        # Not "the database is unreachable": it answered, a transaction holds what we need.
        print(f"campaignd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except asyncpg.RaiseError as exc:
        # A migration refusing the data it found, in its own words (RAISE EXCEPTION ... HINT).
        hint = f" {exc.hint}" if exc.hint else ""
        print(f"campaignd: {exc.message}; nothing was applied.{hint}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await connection.close()
    log.info("migrated", applied=applied, senders=sorted(settings.senders))
    return EXIT_OK


async def _cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from campaignd.operator import OperatorError, connected
    from campaignd.status import fetch_status, print_status

    # Through the operator commands' connection: a missing database or schema is one plain
    # line, as for every other command, not a traceback.
    try:
        async with connected(settings) as connection:
            rows = await fetch_status(connection, str(args.campaign_id) if args.campaign_id else None)
    except OperatorError as exc:
        print(f"campaignd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.campaign_id and not rows:
        print(f"campaignd: no campaign {args.campaign_id}", file=sys.stderr)
        return EXIT_FAILURE
    print_status(rows, as_json=args.json)
    return EXIT_OK


async def _cmd_pause(settings: Settings, args: argparse.Namespace) -> int:
    from campaignd.operator import cmd_pause

    return await cmd_pause(settings, str(args.campaign_id))


async def _cmd_resume(settings: Settings, args: argparse.Namespace) -> int:
    from campaignd.operator import cmd_resume

    return await cmd_resume(settings, str(args.campaign_id))


async def _cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    from campaignd.operator import cmd_cancel

    return await cmd_cancel(settings, str(args.campaign_id))


async def _cmd_daemons(settings: Settings, args: argparse.Namespace) -> int:
    from campaignd.operator import cmd_daemons

    return await cmd_daemons(settings, as_json=args.json)


async def _cmd_senders(settings: Settings, args: argparse.Namespace) -> int:
    from campaignd.operator import cmd_senders

    return await cmd_senders(settings, as_json=args.json)


async def _cmd_resume_sender(settings: Settings, args: argparse.Namespace) -> int:
    from campaignd.operator import cmd_resume_sender

    return await cmd_resume_sender(settings, args.sender_id)


async def _cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    from campaignd.operator import cmd_doctor

    campaign_id = str(args.campaign_id) if args.campaign_id else None
    return await cmd_doctor(settings, campaign_id, as_json=args.json)


async def _cmd_healthcheck(settings: Settings, args: argparse.Namespace) -> int:
    from campaignd.operator import cmd_healthcheck, resolve_health_url

    try:
        url = resolve_health_url(settings, args.url)
    except ValueError as exc:
        print(f"campaignd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return await cmd_healthcheck(url)


async def _cmd_campaign(settings: Settings, args: argparse.Namespace) -> int:
    from campaignd.bulkload import CreateOptions, cmd_campaign_create

    return await cmd_campaign_create(
        settings,
        CreateOptions(
            sender_id=args.sender,
            message_file=args.message,
            recipients_file=args.recipients,
            start=args.start,
            name=args.name,
            rate_per_second=args.rate,
            on_bad_row=args.on_bad_row,
        ),
    )
