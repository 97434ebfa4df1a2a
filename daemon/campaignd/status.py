"""``campaignd status``: campaigns, their counts and progress."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from campaignd.sql import QUERIES

if TYPE_CHECKING:
    from campaignd.db import Connection


async def fetch_status(connection: Connection, campaign_id: str | None) -> list[dict[str, Any]]:
    if campaign_id is None:
        rows = await connection.fetch(QUERIES["campaign_status_all"], 50)
    else:
        rows = await connection.fetch(QUERIES["campaign_status_one"], campaign_id)
    result = []
    for row in rows:
        item = dict(row)
        item["id"] = str(item["id"])
        done = item["sent_count"] + item["failed_count"] + item["skipped_count"]
        item["progress"] = round(100.0 * done / item["total_count"], 1) if item["total_count"] else None
        if campaign_id is not None:
            errors = await connection.fetch(QUERIES["campaign_error_counts"], campaign_id)
            item["errors"] = [dict(error) for error in errors]
        result.append(item)
    return result


def print_status(rows: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    table = Table(title="campaigns")
    for column in (
        "id",
        "name",
        "sender",
        "status",
        "total",
        "sent",
        "failed",
        "skipped",
        "open",
        "progress",
        "reason",
    ):
        table.add_column(column, overflow="fold")
    for row in rows:
        # Text, never markup: names are the host's and reasons quote providers, and a "[/x]"
        # in either made rich raise, which took the whole listing down with one campaign.
        table.add_row(
            *(
                Text(cell)
                for cell in (
                    row["id"],
                    row["name"],
                    row["sender_id"],
                    row["status"],
                    str(row["total_count"]),
                    str(row["sent_count"]),
                    str(row["failed_count"]),
                    str(row["skipped_count"]),
                    str(row["open_count"]),
                    "" if row["progress"] is None else f"{row['progress']}%",
                    row["status_reason"] or "",
                )
            )
        )
    # Piped output (scripts, `watch`) would otherwise be squeezed to 80 columns and fold ids.
    console = Console() if sys.stdout.isatty() else Console(width=220)
    console.print(table)
    for row in rows:
        for error in row.get("errors", []):
            console.print(Text(f"  {error['state']:>8} {error['error_code']}: {error['n']}"))
