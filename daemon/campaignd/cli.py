"""Command line: ``campaignd run | migrate | status | demo``.

Exit codes: 0 success, 1 runtime failure (database unreachable, schema not migrated),
2 bad configuration or usage (systemd's RestartPreventExitStatus=2 stops a crash loop).
"""

from __future__ import annotations

import argparse
import asyncio
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
    return parser


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
        return EXIT_CONFIG
    configure_logging(settings.log.format, settings.log.level)
    handlers: dict[str, Callable[[Settings, argparse.Namespace], Awaitable[int]]] = {
        "run": _cmd_run,
        "migrate": _cmd_migrate,
        "status": _cmd_status,
    }
    handler = handlers[args.command]
    return _run_async(lambda: handler(settings, args))  # type: ignore[arg-type,return-value]


async def _cmd_run(settings: Settings, _args: argparse.Namespace) -> int:
    from campaignd.daemon import Daemon, shutdown_on_signals
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
    with shutdown_on_signals(shutdown):
        try:
            await daemon.run()
        except SchemaNotReady as exc:
            structlog.get_logger("campaignd").error("schema_not_ready", reason=str(exc))
            return EXIT_FAILURE
    return EXIT_OK


async def _cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from campaignd import db
    from campaignd.daemon import sync_senders
    from campaignd.schema import migrate

    log = structlog.get_logger("campaignd")
    try:
        connection = await db.connect(settings.database)
    except Exception as exc:
        if not db.is_transient_db_error(exc):
            raise
        log.error("database_unreachable", error=type(exc).__name__)
        return EXIT_FAILURE
    try:
        applied = await migrate(connection)
        await sync_senders(connection, settings)
    finally:
        await connection.close()
    log.info("migrated", applied=applied, senders=sorted(settings.senders))
    return EXIT_OK


async def _cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from campaignd import db
    from campaignd.status import fetch_status, print_status

    connection = await db.connect(settings.database)
    try:
        rows = await fetch_status(connection, str(args.campaign_id) if args.campaign_id else None)
    finally:
        await connection.close()
    if args.campaign_id and not rows:
        print(f"campaignd: no campaign {args.campaign_id}", file=sys.stderr)
        return EXIT_FAILURE
    print_status(rows, as_json=args.json)
    return EXIT_OK
