"""Chaos, longer: the CI chaos suite's driver (tests/chaos/driver.py) with more of everything.

    python bench/chaos.py [--instances 3] [--recipients 100000] [--kills 30] [--stalls 6]
                          [--restarts 0] [--db-outages 2] [--seconds 150] [--lease-seconds 2]

Real ``campaignd run`` processes on an embedded PostgreSQL (default durability) and the fake
provider in a process of its own (latency 20-80 ms, 503s and 429s with Retry-After in periodic
storms, answers held past the client timeout, ~1% of addresses always refused). Instances are
SIGKILLed and started again, SIGSTOPped past their lease and SIGCONTed, optionally SIGTERMed
and started again; the database is stopped for ``--outage-seconds`` and started on the same
data directory. Chaos events are spread over ``--seconds``; then the campaigns are left to
finish and every instance gets SIGTERM.

Printed: kills and stalls survived, database outages survived, messages sent, duplicates,
lost, takeover time after a kill or stall (p50 and max against lease_seconds: from the signal
to the lane's lease row showing another live owner, polled every 0.1 s, and to that owner's
first request at the provider), recovery after the database returned (from the moment its
start began to the first request at the provider, and how many requests arrived before the
start command returned), the busiest 1-second window per sender against rate + burst,
what the provider answered, and every invariant that did not hold (exit code 1 if any).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
# The driver lives with the tests it serves; the repository root makes it importable.
sys.path.insert(0, str(BENCH_DIR.parent))

from tests.chaos.driver import ChaosPlan, ChaosReport, run_chaos  # noqa: E402

from _common import embedded_postgres, new_workdir, refresh_settings  # noqa: E402
from campaignd import db  # noqa: E402
from campaignd.config import DatabaseConfig  # noqa: E402
from campaignd.schema import migrate  # noqa: E402


async def prepare(url: str) -> None:
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    try:
        await migrate(connection)
    finally:
        await connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument(
        "--recipients", type=int, default=100_000, help="in all, over 4 campaigns on 2 senders"
    )
    parser.add_argument("--kills", type=int, default=30, help="SIGKILL + start again")
    parser.add_argument("--stalls", type=int, default=6, help="SIGSTOP past the lease, then SIGCONT")
    parser.add_argument("--restarts", type=int, default=0, help="SIGTERM (must exit 0) + start again")
    parser.add_argument("--db-outages", type=int, default=2)
    parser.add_argument("--outage-seconds", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=150.0, help="spread the chaos events over this long")
    parser.add_argument("--lease-seconds", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (daemon logs)")
    args = parser.parse_args()

    events = args.kills + args.stalls + args.restarts + args.db_outages
    # Outages take their own length on top of the gap before them.
    gap = max(0.5, (args.seconds - args.db_outages * args.outage_seconds) / max(1, events))
    plan = ChaosPlan(
        instances=args.instances,
        recipients=args.recipients,
        kills=args.kills,
        stalls=args.stalls,
        restarts=args.restarts,
        db_outages=args.db_outages,
        db_outage_seconds=args.outage_seconds,
        event_gap_seconds=(gap * 0.5, gap * 1.5),
        lease_seconds=args.lease_seconds,
        seed=args.seed,
        finish_timeout_seconds=max(300.0, args.recipients / 100),
    )
    workdir = new_workdir("campaignd-chaos-")
    started = time.monotonic()
    report: ChaosReport | None = None
    try:
        with embedded_postgres(workdir) as postgres:
            asyncio.run(refresh_settings(postgres))
            print(
                f"PostgreSQL {postgres.version}: "
                + ", ".join(f"{k}={v}" for k, v in postgres.durability.items())
            )
            asyncio.run(prepare(postgres.url))
            print(f"plan: {plan}")
            report = asyncio.run(run_chaos(plan, postgres.url, postgres.server, workdir))
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    assert report is not None
    print()
    print("\n".join(report.lines()))
    print(f"total {time.monotonic() - started:.0f} s")
    return 1 if report.violations or report.rate_violations else 0


if __name__ == "__main__":
    sys.exit(main())
