"""Three real daemons under fire: SIGKILLed, frozen past their lease, restarted, the database
stopped under them; afterwards nothing lost, nothing doubled, every rule kept (see driver.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.schema import migrate
from tests.chaos.driver import ChaosPlan, run_chaos


@pytest.mark.timeout(420)
async def test_three_instances_killed_frozen_and_cut_off_from_the_database_lose_and_double_nothing(
    tmp_path: Path, own_server: tuple[str, Any]
) -> None:
    # A PostgreSQL of the test's own: stopping the session's shared server would break every
    # other test running beside this one.
    url, server = own_server
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    try:
        await migrate(connection)
    finally:
        await connection.close()

    report = await run_chaos(ChaosPlan(), url, server, tmp_path)

    print("\n".join(report.lines()))
    assert report.violations == []
    assert report.kills >= 10 and report.stalls >= 3 and len(report.outages) == 1
    assert report.lost == 0 and report.duplicates == 0
    assert report.sent > 0 and report.failed > 0
    # The promise: in no 1-second window does the provider accept more than rate + burst of a
    # sender's sends. A lane that starts or resumes (takeover, restart, the database back)
    # paces its first window at the rate, which leaves the burst as slack for requests that
    # leave late while connections open in a busy process.
    assert report.rate_violations == []
