"""The frame of the real providers' adapters (WhatsApp, Messenger/Instagram, Twilio).

Each adapter says how a campaign's rendered message must look, how one request is built and
how an answer is classified; this frame runs the pre-flight over the first recipients'
messages, refuses a message no request could carry, and posts through the shared transport.
"""

from __future__ import annotations

from collections.abc import Awaitable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from campaignd.outcomes import ResultKind, SendResult
from campaignd.providers.base import Delivery
from campaignd.providers.transport import Classifier, HttpTransport


class SenderSettings(Protocol):
    """What the frame reads of any sender's config."""

    @property
    def resend_in_doubt(self) -> bool: ...

    @property
    def timeout_seconds(self) -> float: ...


def bearer_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a rendered message cannot be sent."""

    reason: str
    # True when the recipient's own values are at fault (a variable makes a text too long),
    # not the campaign's message: that recipient is skipped and the campaign goes on.
    recipient_level: bool = False


@dataclass(frozen=True, slots=True)
class Request:
    url: str
    data: bytes
    headers: Mapping[str, str]


def preflight(problems: Sequence[Problem | None], shapes: Sequence[Hashable]) -> str | None:
    """Why a campaign cannot be valid, from its first recipients' messages, or None.

    A problem of the message's structure holds for every recipient. A problem of one
    recipient's values fails the campaign only when every message looked at has one: then it
    is the message, not the recipients.
    """
    for problem in problems:
        if problem is not None and not problem.recipient_level:
            return problem.reason
    found = [problem for problem in problems if problem is not None]
    if found and len(found) == len(problems):
        return f"all of the first {len(problems)} rendered messages are invalid: {found[0].reason}"
    if len(set(shapes)) > 1:
        return "the rendered messages differ in structure between recipients (parameter counts differ)"
    return None


def text_problem(text: Any, what: str, limit: int, *, utf8_bytes: bool = False) -> Problem | None:
    """A required text: present, not blank once rendered, within the provider's limit."""
    if not isinstance(text, str):
        return Problem(f"{what} must be text")
    if not text.strip():
        return Problem(f"{what} is empty once rendered", recipient_level=True)
    size = len(text.encode("utf-8", "surrogatepass")) if utf8_bytes else len(text)
    if size > limit:
        unit = "bytes" if utf8_bytes else "characters"
        return Problem(f"{what} is {size} {unit}, over the limit of {limit}", recipient_level=True)
    return None


def optional_text_problem(text: Any, what: str, limit: int) -> Problem | None:
    return None if text is None else text_problem(text, what, limit)


class Adapter:
    """Subclasses set ``name`` and implement the three methods that raise NotImplementedError."""

    name: str
    phone_addresses = False

    def __init__(
        self,
        sender_id: str,
        config: SenderSettings,
        *,
        connection_limit: int,
        secrets: Iterable[str],
        classify: Classifier,
    ) -> None:
        self.sender_id = sender_id
        self.resend_in_doubt = config.resend_in_doubt
        self._transport = HttpTransport(
            timeout_seconds=config.timeout_seconds, connection_limit=connection_limit, secrets=secrets
        )
        self._classify = classify

    def normalize_address(self, address: str) -> str:
        raise NotImplementedError

    def problem(self, message: Any) -> Problem | None:
        """What makes this rendered message unsendable, or None."""
        raise NotImplementedError

    def request(self, delivery: Delivery) -> Request:
        raise NotImplementedError

    def shape(self, message: Any) -> Hashable:
        """What must be the same in every recipient's message (e.g. parameter counts)."""
        return None

    def check_messages(self, messages: Sequence[Any]) -> str | None:
        return preflight([self.problem(m) for m in messages], [self.shape(m) for m in messages])

    def send(self, delivery: Delivery) -> Awaitable[SendResult]:
        # The request is built here, before anything is awaited: a bug in building it raises
        # to the caller while nothing has left (see Provider.send).
        problem = self.problem(delivery.message)
        if problem is not None:
            # Nothing was sent: the provider would refuse it, and a request costs rate budget.
            return _already(
                SendResult(
                    ResultKind.SKIPPED,
                    error_code="invalid_message",
                    error_message=self._transport.redact(problem.reason),
                )
            )
        request = self.request(delivery)
        return self._transport.post(
            request.url, data=request.data, headers=request.headers, classify=self._classify
        )

    def redact(self, text: str) -> str:
        return self._transport.redact(text)

    async def close(self) -> None:
        await self._transport.close()


async def _already(result: SendResult) -> SendResult:
    return result
