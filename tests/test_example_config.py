"""config.example.toml is the reference for operators: it must load and name every field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from campaignd.config import (
    HttpSenderConfig,
    MessengerSenderConfig,
    Settings,
    TwilioSenderConfig,
    WhatsAppSenderConfig,
    load_settings,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMS_PROVIDER_AUTHORIZATION", "Bearer example-token")
    monkeypatch.setenv("WHATSAPP_ACCESS_TOKEN", "example-whatsapp-token")
    monkeypatch.setenv("MESSENGER_PAGE_TOKEN", "example-page-token")
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "example-twilio-token")
    settings = load_settings(EXAMPLE)
    assert {sender.provider for sender in settings.senders.values()} == {
        "http",
        "whatsapp",
        "messenger",
        "twilio",
    }


def _documented_keys(section: str) -> set[str]:
    text = EXAMPLE.read_text()
    match = re.search(rf"^\[{re.escape(section)}\]\n(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"section [{section}] missing from config.example.toml"
    return set(re.findall(r"^#?\s*([a-z_]+)\s*=", match.group(1), re.MULTILINE))


@pytest.mark.parametrize(
    ("section", "model"),
    [(name, field.annotation) for name, field in Settings.model_fields.items() if name != "senders"]
    + [
        ("senders.sms", HttpSenderConfig),
        ("senders.whatsapp", WhatsAppSenderConfig),
        ("senders.messenger", MessengerSenderConfig),
        ("senders.twilio_sms", TwilioSenderConfig),
    ],
)
def test_every_field_is_documented_in_the_example(section: str, model: type[BaseModel]) -> None:
    # Fields every sender shares are documented once, in the first (http) section.
    shared = _documented_keys("senders.sms") if section.startswith("senders.") else set()
    assert set(model.model_fields) <= _documented_keys(section) | shared
