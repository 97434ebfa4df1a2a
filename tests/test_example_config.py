"""config.example.toml is the reference for operators: it must load and name every field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from campaignd.config import SenderConfig, Settings, load_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMS_PROVIDER_AUTHORIZATION", "Bearer example-token")
    settings = load_settings(EXAMPLE)
    assert "sms" in settings.senders


def _documented_keys(section: str) -> set[str]:
    text = EXAMPLE.read_text()
    match = re.search(rf"^\[{re.escape(section)}\]\n(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"section [{section}] missing from config.example.toml"
    return set(re.findall(r"^#?\s*([a-z_]+)\s*=", match.group(1), re.MULTILINE))


@pytest.mark.parametrize(
    ("section", "model"),
    [(name, field.annotation) for name, field in Settings.model_fields.items() if name != "senders"]
    + [("senders.sms", SenderConfig)],
)
def test_every_field_is_documented_in_the_example(section: str, model: type[BaseModel]) -> None:
    assert set(model.model_fields) <= _documented_keys(section)
