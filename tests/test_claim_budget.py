"""How much a lane claims ahead, and what it does after a claim round: pure decisions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from campaignd.dispatch import CLAIM_HORIZON_SECONDS, FeedStep, after_claim_round, claim_budget, claim_limit


def test_a_fast_sender_is_bound_by_concurrency_and_batch() -> None:
    # The throughput benchmark's sender: the rate is out of the way.
    assert claim_budget(concurrency=64, batch_size=1000, rate_per_second=1_000_000, burst=100_000) == 1064


def test_a_rate_bound_sender_holds_a_second_of_sending_even_with_small_batches() -> None:
    # 200/s with batch_size 100 used to hold 164 claims (0.8 s) and lost 15% of its rate.
    assert claim_budget(concurrency=64, batch_size=100, rate_per_second=200, burst=20) == 220


def test_a_slow_sender_claims_no_more_than_its_horizon() -> None:
    assert claim_budget(concurrency=64, batch_size=500, rate_per_second=5, burst=2) == 12


@given(
    concurrency=st.integers(1, 100_000),
    batch_size=st.integers(1, 100_000),
    rate=st.floats(0.01, 1_000_000),
    burst=st.integers(1, 1_000_000),
)
def test_budget_is_positive_and_bounded(concurrency: int, batch_size: int, rate: float, burst: int) -> None:
    budget = claim_budget(concurrency=concurrency, batch_size=batch_size, rate_per_second=rate, burst=burst)

    assert budget >= 1
    assert budget <= max(1, rate * CLAIM_HORIZON_SECONDS + burst + 1)
    assert budget <= 2 * (concurrency + batch_size)


def test_a_round_that_found_the_room_full_waits_for_room_not_for_every_outcome() -> None:
    # The stall: nothing claimed because nothing fit, taken for nothing left to claim.
    assert (
        after_claim_round(claimed=0, free_room=0, claim_threshold=250, unwritten=1064)
        is FeedStep.WAIT_FOR_ROOM
    )
    assert (
        after_claim_round(claimed=3, free_room=0, claim_threshold=250, unwritten=1064)
        is FeedStep.WAIT_FOR_ROOM
    )


def test_a_round_with_room_to_spare_claims_again_or_waits_by_what_is_out() -> None:
    assert (
        after_claim_round(claimed=1000, free_room=300, claim_threshold=250, unwritten=764)
        is FeedStep.CLAIM_AGAIN
    )
    assert after_claim_round(claimed=0, free_room=300, claim_threshold=250, unwritten=764) is (
        FeedStep.WAIT_UNTIL_WRITTEN
    )
    assert (
        after_claim_round(claimed=0, free_room=1064, claim_threshold=250, unwritten=0)
        is FeedStep.WAIT_FOR_WORK
    )


@given(
    budget=st.integers(1, 10_000),
    threshold_share=st.floats(0.0, 1.0),
    unwritten_share=st.floats(0.0, 1.0),
    claimed=st.integers(0, 10_000),
)
def test_a_lane_waits_for_room_only_while_claims_are_out(
    budget: int, threshold_share: float, unwritten_share: float, claimed: int
) -> None:
    # Room frees only as outcomes are written: with none to come, that wait would last a poll.
    threshold = max(1, int(budget * threshold_share))
    unwritten = int(budget * unwritten_share)
    step = after_claim_round(
        claimed=claimed, free_room=budget - unwritten, claim_threshold=threshold, unwritten=unwritten
    )

    if step is FeedStep.WAIT_FOR_ROOM:
        assert unwritten > 0
    if step is FeedStep.WAIT_FOR_WORK:
        assert unwritten == 0 and claimed == 0


def test_a_lane_with_nothing_out_first_claims_what_its_workers_can_send_at_once() -> None:
    # Every worker waits for the first claim of a starting campaign: it is kept small.
    assert claim_limit(batch_size=1000, free_room=1064, run_room=None, outstanding=0, workers=64) == 64
    # With those in the air, the next claim is a whole batch.
    assert claim_limit(batch_size=1000, free_room=1000, run_room=None, outstanding=64, workers=64) == 1000
    assert claim_limit(batch_size=1000, free_room=300, run_room=None, outstanding=764, workers=64) == 300
    # A capped campaign claims no more than its cap allows.
    assert claim_limit(batch_size=1000, free_room=1064, run_room=5, outstanding=0, workers=64) == 5


@given(
    batch_size=st.integers(1, 100_000),
    free_room=st.integers(1, 200_000),
    run_room=st.none() | st.integers(1, 100_000),
    outstanding=st.integers(0, 200_000),
    workers=st.integers(1, 100_000),
)
def test_a_claim_asks_for_at_least_one_and_never_more_than_any_bound(
    batch_size: int, free_room: int, run_room: int | None, outstanding: int, workers: int
) -> None:
    limit = claim_limit(
        batch_size=batch_size,
        free_room=free_room,
        run_room=run_room,
        outstanding=outstanding,
        workers=workers,
    )

    assert 1 <= limit <= min(batch_size, free_room)
    if run_room is not None:
        assert limit <= run_room
    if outstanding == 0:
        assert limit <= workers
