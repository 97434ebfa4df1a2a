"""The chaos driver's own accounting: a miscount there either hides a daemon's fault or
reports one that did not happen."""

from __future__ import annotations

from tests.chaos.driver import Outage, outage_arrivals

LEASE = 2.0


def test_a_request_past_the_lease_before_the_restart_began_is_blind() -> None:
    outage = Outage(stopped_at=100.0, restarting_at=110.0, started_at=110.12)
    # Within the lease (sent before the lane saw it lost), past it, just before the start.
    arrivals = [101.5, 102.9, 103.5, 109.99, 110.2]
    blind, while_starting, recovery = outage_arrivals(arrivals, outage, LEASE)
    assert blind == [103.5, 109.99]
    assert while_starting == 0
    assert recovery is not None and abs(recovery - 0.2) < 1e-9


def test_requests_while_the_start_command_runs_are_counted_apart_not_blind() -> None:
    # The database answers before pg_ctl notices: lanes may resume inside the start.
    outage = Outage(stopped_at=100.0, restarting_at=110.0, started_at=110.12)
    arrivals = [110.03, 110.05, 110.11, 110.5]
    blind, while_starting, recovery = outage_arrivals(arrivals, outage, LEASE)
    assert blind == []
    assert while_starting == 3
    assert recovery is not None and abs(recovery - 0.03) < 1e-9


def test_an_outage_with_no_request_after_it_has_no_recovery() -> None:
    outage = Outage(stopped_at=100.0, restarting_at=110.0, started_at=110.12)
    blind, while_starting, recovery = outage_arrivals([99.0, 100.5], outage, LEASE)
    assert (blind, while_starting, recovery) == ([], 0, None)
