"""The ``messenger`` and ``instagram`` providers: Meta's Send API (one class, two names).

Request: ``POST {api_base}/{page_id}/messages`` (``page_id`` defaults to ``me``, the token's
own page) with ``Authorization: Bearer <access_token>`` and a JSON body::

    {"recipient": {"id": "<PSID or IGSID>"}, "messaging_type": "UPDATE", "message": {...}}

plus ``"tag"`` when ``messaging_type`` is ``MESSAGE_TAG``. The campaign's ``message`` is the
part of that body campaignd does not own::

    {"message": {"text": "Hi {{first_name}}"}, "messaging_type": "MESSAGE_TAG", "tag": "ACCOUNT_UPDATE"}

``message`` (a Send API message: ``text`` or ``attachment``, optional ``quick_replies``) is
required; ``messaging_type`` and ``tag`` fall back to the sender's config;
``notification_type`` and ``persona_id`` pass through. Addresses are the numeric page-scoped
ids Meta gives users of the page. A 2xx is ``sent`` with ``message_id``; errors are classified
by :func:`campaignd.providers.meta.classify_meta`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from campaignd.config import MessengerSenderConfig
from campaignd.providers.adapter import Adapter, Problem, Request, bearer_headers, text_problem
from campaignd.providers.addresses import normalize_scoped_id
from campaignd.providers.base import Delivery
from campaignd.providers.meta import classify_meta

MESSENGER_TEXT_LIMIT = 2000
# Instagram counts UTF-8 bytes, not characters.
INSTAGRAM_TEXT_BYTES = 1000
MESSAGING_TYPES = frozenset({"RESPONSE", "UPDATE", "MESSAGE_TAG"})
# The tags Meta still accepts; Instagram knows only HUMAN_AGENT.
MESSAGE_TAGS: Mapping[str, frozenset[str]] = {
    "messenger": frozenset(
        {
            "ACCOUNT_UPDATE",
            "CONFIRMED_EVENT_UPDATE",
            "CUSTOMER_FEEDBACK",
            "HUMAN_AGENT",
            "POST_PURCHASE_UPDATE",
        }
    ),
    "instagram": frozenset({"HUMAN_AGENT"}),
}
ATTACHMENT_TYPES = frozenset({"image", "audio", "video", "file", "template"})
NOTIFICATION_TYPES = frozenset({"REGULAR", "SILENT_PUSH", "NO_PUSH"})
MESSAGE_FIELDS = frozenset({"message", "messaging_type", "tag", "notification_type", "persona_id"})
MAX_QUICK_REPLIES = 13


class MessengerProvider(Adapter):
    def __init__(self, sender_id: str, config: MessengerSenderConfig, *, connection_limit: int) -> None:
        token = config.access_token.get_secret_value()
        super().__init__(
            sender_id, config, connection_limit=connection_limit, secrets=[token], classify=classify_meta
        )
        self.name = config.provider
        self._messaging_type = config.messaging_type
        self._tag = config.tag
        self._url = f"{config.api_base}/{config.page_id}/messages"
        self._headers = bearer_headers(token)

    def normalize_address(self, address: str) -> str:
        return normalize_scoped_id(address, "PSID" if self.name == "messenger" else "Instagram-scoped id")

    def problem(self, message: Any) -> Problem | None:
        return send_api_message_problem(message, self.name, self._messaging_type, self._tag)

    def request(self, delivery: Delivery) -> Request:
        message: Mapping[str, Any] = delivery.message
        messaging_type = message.get("messaging_type", self._messaging_type)
        body: dict[str, Any] = {
            "recipient": {"id": delivery.address},
            "messaging_type": messaging_type,
            "message": message["message"],
        }
        if messaging_type == "MESSAGE_TAG":
            body["tag"] = message.get("tag", self._tag)
        for passed in ("notification_type", "persona_id"):
            if passed in message:
                body[passed] = message[passed]
        return Request(self._url, orjson.dumps(body), self._headers)


def send_api_message_problem(
    message: Any, provider: str, default_type: str, default_tag: str | None
) -> Problem | None:
    """Why a rendered message cannot go through the Send API, or None (pure)."""
    if not isinstance(message, dict):
        return Problem('the message must be a JSON object such as {"message": {"text": "..."}}')
    if "recipient" in message:
        return Problem("the message must not set 'recipient': campaignd sets it for every recipient")
    unknown = sorted(set(message) - MESSAGE_FIELDS)
    if unknown:
        return Problem(
            f"unknown field {unknown[0]!r} in the message; expected {', '.join(sorted(MESSAGE_FIELDS))}"
        )
    messaging_type = message.get("messaging_type", default_type)
    if not isinstance(messaging_type, str) or messaging_type not in MESSAGING_TYPES:
        return Problem(f"messaging_type must be one of {', '.join(sorted(MESSAGING_TYPES))}")
    if messaging_type == "MESSAGE_TAG":
        tag = message.get("tag", default_tag)
        if tag is None:
            return Problem('messaging_type MESSAGE_TAG needs a "tag" (in the message or the sender config)')
        if not isinstance(tag, str) or tag not in MESSAGE_TAGS[provider]:
            return Problem(
                f"{provider} accepts the tags {', '.join(sorted(MESSAGE_TAGS[provider]))}, not {tag!r}"
            )
    notification_type = message.get("notification_type", "REGULAR")
    if not isinstance(notification_type, str) or notification_type not in NOTIFICATION_TYPES:
        return Problem(f"notification_type must be one of {', '.join(sorted(NOTIFICATION_TYPES))}")
    body = message.get("message")
    if not isinstance(body, dict):
        return Problem('the message needs a "message" object with "text" or "attachment"')
    return _content_problem(body, provider)


def _content_problem(body: Mapping[str, Any], provider: str) -> Problem | None:
    has_text, has_attachment = "text" in body, "attachment" in body
    if has_text == has_attachment:
        return Problem('message needs exactly one of "text" and "attachment"')
    quick_replies = body.get("quick_replies")
    if quick_replies is not None and (
        not isinstance(quick_replies, list) or len(quick_replies) > MAX_QUICK_REPLIES
    ):
        return Problem(f"message.quick_replies must be a list of at most {MAX_QUICK_REPLIES}")
    if has_text:
        if provider == "instagram":
            return text_problem(body["text"], "message.text", INSTAGRAM_TEXT_BYTES, utf8_bytes=True)
        return text_problem(body["text"], "message.text", MESSENGER_TEXT_LIMIT)
    attachment = body["attachment"]
    if (
        not isinstance(attachment, dict)
        or not isinstance(attachment.get("type"), str)
        or attachment["type"] not in ATTACHMENT_TYPES
        or not isinstance(attachment.get("payload"), dict)
    ):
        return Problem(
            f"message.attachment needs a type ({', '.join(sorted(ATTACHMENT_TYPES))}) and a payload object"
        )
    return None
