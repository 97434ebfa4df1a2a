"""Pure lane decisions: acquiring and handing over (the database side is in test_dispatch and
test_watchdog)."""

from __future__ import annotations

from campaignd.leasing import (
    DEFERRAL_PER_HELD_LANE_SECONDS,
    MAX_ACQUISITION_DEFERRAL_SECONDS,
    Peer,
    acquisition_deferral,
    handover_grace,
    lane_to_hand_over,
)


def test_an_idle_daemon_takes_a_lane_at_once() -> None:
    assert acquisition_deferral(0) == 0.0


def test_a_busier_daemon_waits_longer_up_to_a_cap() -> None:
    waits = [acquisition_deferral(held) for held in range(100)]
    assert waits == sorted(waits)
    assert waits[1] == DEFERRAL_PER_HELD_LANE_SECONDS
    assert waits[3] > waits[1]
    assert max(waits) == MAX_ACQUISITION_DEFERRAL_SECONDS


# ------------------------------------------------------------------ handing lanes over


def peer(owner: str, lanes: int, senders: str = "abcdefgh") -> Peer:
    return Peer(owner, frozenset(senders), lanes)


def held(*senders: str, since: float = 0.0) -> dict[str, float]:
    return {sender: since + index for index, sender in enumerate(senders)}


def test_a_lane_goes_to_a_peer_two_lanes_behind() -> None:
    handover = lane_to_hand_over(held("a", "b"), [peer("idle", 0)], now=100.0, settled_after=10.0)
    assert handover is not None
    assert handover.to.owner == "idle"
    # The lane taken last moves; the one held longest keeps its warm connections.
    assert handover.sender_id == "b"


def test_one_lane_apart_nothing_moves() -> None:
    # Moving a lane would only reverse the gap, and the peer would hand it straight back.
    assert lane_to_hand_over(held("a", "b", "c"), [peer("p", 2)], now=100.0, settled_after=10.0) is None
    assert lane_to_hand_over(held("a"), [peer("p", 0)], now=100.0, settled_after=10.0) is None


def test_only_to_a_peer_configured_for_that_sender() -> None:
    mine = held("a", "b", "c")
    assert lane_to_hand_over(mine, [peer("other", 0, senders="xyz")], now=100.0, settled_after=10.0) is None
    handover = lane_to_hand_over(mine, [peer("p", 0, senders="a")], now=100.0, settled_after=10.0)
    assert handover is not None and handover.sender_id == "a"


def test_a_lane_just_taken_stays() -> None:
    mine = {"a": 95.0, "b": 99.0}
    assert lane_to_hand_over(mine, [peer("p", 0)], now=100.0, settled_after=10.0) is None
    mine = {"a": 80.0, "b": 99.0}
    handover = lane_to_hand_over(mine, [peer("p", 0)], now=100.0, settled_after=10.0)
    assert handover is not None and handover.sender_id == "a"


def test_the_least_busy_peer_is_served_first() -> None:
    peers = [peer("busy", 3), peer("idle-b", 0), peer("idle-a", 0), peer("one", 1)]
    handover = lane_to_hand_over(held(*"abcdef"), peers, now=100.0, settled_after=10.0)
    assert handover is not None and handover.to.owner == "idle-a"


def test_a_peer_that_serves_none_of_them_does_not_hide_one_that_can() -> None:
    peers = [peer("idle-elsewhere", 0, senders="xyz"), peer("one", 1, senders="c")]
    handover = lane_to_hand_over(held("a", "b", "c"), peers, now=100.0, settled_after=10.0)
    assert handover is not None and (handover.to.owner, handover.sender_id) == ("one", "c")


def settle(lanes: dict[str, int], rounds: int = 50) -> dict[str, int]:
    """Daemons deciding one after the other, each from the others' counts, until none moves."""
    for _ in range(rounds):
        moved = False
        for owner in sorted(lanes):
            mine = {f"{owner}-{i}": 0.0 for i in range(lanes[owner])}
            others = [Peer(o, frozenset(mine), n) for o, n in lanes.items() if o != owner]
            handover = lane_to_hand_over(mine, others, now=100.0, settled_after=10.0)
            if handover is not None:
                lanes[owner] -= 1
                lanes[handover.to.owner] += 1
                moved = True
        if not moved:
            return lanes
    raise AssertionError(f"still moving after {rounds} rounds: {lanes}")


def test_replicas_settle_within_one_lane_of_each_other() -> None:
    for start in ([12, 0, 0], [5, 5, 0], [7, 1], [1, 0, 0, 0], [9, 0, 0, 0, 0]):
        lanes = {f"d{i}": n for i, n in enumerate(start)}
        final = settle(lanes)
        assert sum(final.values()) == sum(start)
        assert max(final.values()) - min(final.values()) <= 1, final


def test_a_handed_over_lane_is_left_to_its_new_owner_for_a_few_polls() -> None:
    assert handover_grace(1.0) >= 3.0
    assert handover_grace(0.2) > handover_grace(0.1)
