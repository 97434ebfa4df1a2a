"""How much a lane claims ahead: a pure decision."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from campaignd.dispatch import CLAIM_HORIZON_SECONDS, claim_budget


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
