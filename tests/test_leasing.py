"""Pure lane-acquisition decisions (the database side is in test_dispatch and test_watchdog)."""

from __future__ import annotations

from campaignd.leasing import (
    DEFERRAL_PER_HELD_LANE_SECONDS,
    MAX_ACQUISITION_DEFERRAL_SECONDS,
    acquisition_deferral,
)


def test_an_idle_daemon_takes_a_lane_at_once() -> None:
    assert acquisition_deferral(0) == 0.0


def test_a_busier_daemon_waits_longer_up_to_a_cap() -> None:
    waits = [acquisition_deferral(held) for held in range(100)]
    assert waits == sorted(waits)
    assert waits[1] == DEFERRAL_PER_HELD_LANE_SECONDS
    assert waits[3] > waits[1]
    assert max(waits) == MAX_ACQUISITION_DEFERRAL_SECONDS
