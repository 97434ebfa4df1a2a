"""The ``whatsapp`` provider: WhatsApp Cloud API.

Request: ``POST {api_base}/{phone_number_id}/messages`` with ``Authorization: Bearer
<access_token>`` and a JSON body: the campaign's rendered message merged with the fields
campaignd owns::

    {"messaging_product": "whatsapp", "recipient_type": "individual", "to": "15550001111",
     "biz_opaque_callback_data": "<campaign_id>:<recipient_id>", **message}

The campaign's ``message`` is a Cloud API message object without those fields, for example
``{"type": "template", "template": {"name": "spring_sale", "language": {"code": "en_US"},
"components": [{"type": "body", "parameters": [{"type": "text", "text": "{{first_name}}"}]}]}}``
or ``{"type": "text", "text": {"body": "Hi {{first_name}}"}}``; header media go by ``link``
or ``id``. ``biz_opaque_callback_data`` carries the recipient's idempotency key, which Meta
echoes in status webhooks: a send whose outcome was unknown can be reconciled there.

Addresses are E.164 numbers (separators and a leading + accepted) and are sent as digits.
A 2xx is ``sent`` with ``messages[0].id`` (the wamid); errors are classified by
:func:`campaignd.providers.meta.classify_meta`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import orjson

from campaignd.config import WhatsAppSenderConfig
from campaignd.providers.adapter import (
    Adapter,
    Problem,
    Request,
    bearer_headers,
    optional_text_problem,
    text_problem,
)
from campaignd.providers.addresses import normalize_e164
from campaignd.providers.base import Delivery
from campaignd.providers.meta import classify_meta

TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
INTERACTIVE_BODY_LIMIT = 1024
MEDIA_TYPES = frozenset({"image", "audio", "video", "document", "sticker"})
MESSAGE_TYPES = MEDIA_TYPES | {"text", "template", "interactive", "location", "contacts"}
# Set by campaignd on every request; a message may repeat the two constants, not change them.
OWNED_FIELDS: Mapping[str, str | None] = {
    "messaging_product": "whatsapp",
    "recipient_type": "individual",
    "to": None,
    "biz_opaque_callback_data": None,
}


class WhatsAppProvider(Adapter):
    name = "whatsapp"
    phone_addresses = True

    def __init__(self, sender_id: str, config: WhatsAppSenderConfig, *, connection_limit: int) -> None:
        token = config.access_token.get_secret_value()
        super().__init__(
            sender_id, config, connection_limit=connection_limit, secrets=[token], classify=classify_meta
        )
        self._url = f"{config.api_base}/{config.phone_number_id}/messages"
        self._headers = bearer_headers(token)

    def normalize_address(self, address: str) -> str:
        # The Cloud API documents "to" as the number with its country code, digits only.
        return normalize_e164(address)[1:]

    def problem(self, message: Any) -> Problem | None:
        return whatsapp_message_problem(message)

    def shape(self, message: Any) -> Hashable:
        return template_shape(message)

    def request(self, delivery: Delivery) -> Request:
        body = {
            **delivery.message,
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": delivery.address,
            "biz_opaque_callback_data": delivery.idempotency_key,
        }
        return Request(self._url, orjson.dumps(body), self._headers)


def whatsapp_message_problem(message: Any) -> Problem | None:
    """Why a rendered message is no Cloud API message object, or None (pure)."""
    if not isinstance(message, dict):
        return Problem('the message must be a JSON object such as {"type": "text", "text": {"body": "..."}}')
    for field, allowed in OWNED_FIELDS.items():
        if field in message and message[field] != allowed:
            return Problem(f"the message must not set {field!r}: campaignd sets it for every recipient")
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        return Problem(f'the message needs a "type", one of {", ".join(sorted(MESSAGE_TYPES))}')
    content = message.get(kind)
    if kind == "contacts":
        if not isinstance(content, list) or not content:
            return Problem('a "contacts" message needs a non-empty "contacts" list')
        return None
    if not isinstance(content, dict):
        return Problem(f'a "{kind}" message needs a "{kind}" object')
    if kind == "text":
        return text_problem(content.get("body"), "text.body", TEXT_LIMIT)
    if kind == "template":
        return _template_problem(content)
    if kind in MEDIA_TYPES:
        return _media_problem(content, kind) or optional_text_problem(
            content.get("caption"), f"{kind}.caption", CAPTION_LIMIT
        )
    if kind == "interactive":
        if not isinstance(content.get("type"), str) or not isinstance(content.get("action"), dict):
            return Problem('an "interactive" message needs a "type" and an "action" object')
        body = content.get("body")
        return optional_text_problem(
            body.get("text") if isinstance(body, dict) else None,
            "interactive.body.text",
            INTERACTIVE_BODY_LIMIT,
        )
    # location
    if "latitude" not in content or "longitude" not in content:
        return Problem('a "location" message needs "latitude" and "longitude"')
    return None


def template_shape(message: Any) -> Hashable:
    """The template's component and parameter counts, which Meta matches against the template."""
    if not isinstance(message, dict) or message.get("type") != "template":
        return None
    template = message.get("template")
    components = template.get("components") if isinstance(template, dict) else None
    if not isinstance(components, list):
        return ()
    # Every field as text: a list or object where a string belongs is the message's problem
    # to report, and must not make the shapes unhashable.
    return tuple(
        (
            str(component.get("type")),
            str(component.get("sub_type")),
            str(component.get("index")),
            len(component["parameters"]) if isinstance(component.get("parameters"), list) else 0,
        )
        if isinstance(component, dict)
        else None
        for component in components
    )


def _template_problem(template: Mapping[str, Any]) -> Problem | None:
    name = template.get("name")
    if not isinstance(name, str) or not name.strip():
        return Problem("the template needs a name (template.name)")
    language = template.get("language")
    code = language.get("code") if isinstance(language, dict) else None
    if not isinstance(code, str) or not code.strip():
        return Problem('the template needs a language code (template.language.code, e.g. "en_US")')
    components = template.get("components", [])
    if not isinstance(components, list):
        return Problem("template.components must be a list")
    for number, component in enumerate(components, 1):
        if not isinstance(component, dict) or not isinstance(component.get("type"), str):
            return Problem(f"template component {number} needs a type (header, body or button)")
        if not isinstance(component.get("sub_type", ""), str):
            return Problem(f"the sub_type of template component {number} must be text")
        parameters = component.get("parameters", [])
        if not isinstance(parameters, list):
            return Problem(f"the parameters of template component {number} must be a list")
        for parameter in parameters:
            problem = _parameter_problem(parameter, component["type"], number)
            if problem is not None:
                return problem
    return None


def _parameter_problem(parameter: Any, component: str, number: int) -> Problem | None:
    where = f"a parameter of template component {number} ({component})"
    if not isinstance(parameter, dict) or not isinstance(parameter.get("type"), str):
        return Problem(f"{where} needs a type")
    kind = parameter["type"]
    if kind == "text":
        text = parameter.get("text")
        if not isinstance(text, str):
            return Problem(f'{where} of type text needs a "text"')
        if not text.strip():
            return Problem(f"{where} is empty once rendered", recipient_level=True)
        # Meta refuses these in header and body parameters; checked here, the recipient is
        # skipped with the reason instead of costing a request.
        if component in ("header", "body") and ("\n" in text or "\t" in text or "     " in text):
            return Problem(
                f"{where} contains a new line, a tab or more than 4 consecutive spaces",
                recipient_level=True,
            )
    elif kind in ("image", "video", "document"):
        media = parameter.get(kind)
        if not isinstance(media, dict):
            return Problem(f'{where} of type {kind} needs an "{kind}" object')
        return _media_problem(media, f"{where} ({kind})")
    return None


def _media_problem(media: Mapping[str, Any], what: str) -> Problem | None:
    texts = [media[key] for key in ("link", "id") if isinstance(media.get(key), str)]
    if any(text.strip() for text in texts):
        return None
    # A link or id that is there but blank came from one recipient's variables (an empty
    # image column): that recipient is skipped, not the campaign failed.
    return Problem(
        f'{what} needs a "link" (https URL) or an "id" (uploaded media)', recipient_level=bool(texts)
    )
