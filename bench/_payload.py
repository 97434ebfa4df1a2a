"""What a campaign's recipients look like, shared by the campaign loader and the raw blast.

Kept free of heavy imports: the raw blast process loads it, and its start-up should cost
no more than aiohttp's own.
"""

from __future__ import annotations

from typing import Any

SENDER_ID = "bench"
# The same template the raw blast renders, so both sides POST bodies of the same shape and size.
MESSAGE_TEMPLATE = {"text": "Hi {{name}}, your order is ready for pickup", "sender": "ACME"}


def address(index: int) -> str:
    return f"+1555{index:07d}"


def variables(index: int) -> dict[str, str]:
    return {"name": f"n{index}"}


def rendered_message(index: int) -> dict[str, str]:
    return {"text": f"Hi n{index}, your order is ready for pickup", "sender": "ACME"}


def message(index: int, campaign_id: str) -> dict[str, Any]:
    """The same fields, and so the same body size, as campaignd's http provider sends."""
    return {
        "to": address(index),
        "message": rendered_message(index),
        "campaign_id": campaign_id,
        "recipient_id": index + 1,
    }
