"""What every provider adapter offers the dispatcher."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from campaignd.outcomes import SendResult


class InvalidAddress(ValueError):
    """The address cannot be sent to by this provider; the recipient is skipped."""


# Made for every message: not frozen, which would cost three times as much to construct.
@dataclass(slots=True)
class Delivery:
    campaign_id: str
    recipient_id: int
    address: str
    message: Any

    @property
    def idempotency_key(self) -> str:
        # Stable across retries and in-doubt resends, so a provider that deduplicates
        # by key delivers a resent message once.
        return f"{self.campaign_id}:{self.recipient_id}"


class Provider(Protocol):
    sender_id: str
    # The adapter's kind ("http", "whatsapp", ...), for reasons shown to operators.
    name: str
    resend_in_doubt: bool
    # Whether addresses are phone numbers, sent as their digits however they were written:
    # duplicates are then found by those digits (campaignd.address_key, schema 9).
    phone_addresses: bool

    def normalize_address(self, address: str) -> str:
        """The address as the provider wants it, or raise InvalidAddress."""
        ...

    def check_messages(self, messages: Sequence[Any]) -> str | None:
        """Pre-flight, before a campaign's first send: the rendered messages of its first
        recipients. Returns why the campaign cannot be valid for this provider, or None."""
        ...

    def send(self, delivery: Delivery) -> Awaitable[SendResult]:
        """Send once; never raises for provider or network errors, it classifies them.

        The request is built in the call itself, and the awaitable returned sends it: an
        exception from the call means nothing left, one from the await that it may have.
        """
        ...

    def redact(self, text: str) -> str:
        """``text`` without this sender's credentials, for what reaches logs or the database."""
        ...

    async def close(self) -> None: ...
