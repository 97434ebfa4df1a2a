"""Provider adapters, chosen by ``provider = ...`` in a ``[senders.<id>]`` section."""

from __future__ import annotations

from campaignd.config import (
    AnySenderConfig,
    HttpSenderConfig,
    MessengerSenderConfig,
    TwilioSenderConfig,
    WhatsAppSenderConfig,
)
from campaignd.providers.base import Delivery, InvalidAddress, Provider
from campaignd.providers.http import HttpProvider
from campaignd.providers.messenger import MessengerProvider
from campaignd.providers.twilio import TwilioProvider
from campaignd.providers.whatsapp import WhatsAppProvider

__all__ = ["Delivery", "InvalidAddress", "Provider", "build_provider"]


def build_provider(sender_id: str, config: AnySenderConfig, *, connection_limit: int) -> Provider:
    if isinstance(config, HttpSenderConfig):
        return HttpProvider(sender_id, config, connection_limit=connection_limit)
    if isinstance(config, WhatsAppSenderConfig):
        return WhatsAppProvider(sender_id, config, connection_limit=connection_limit)
    if isinstance(config, MessengerSenderConfig):
        return MessengerProvider(sender_id, config, connection_limit=connection_limit)
    if isinstance(config, TwilioSenderConfig):
        return TwilioProvider(sender_id, config, connection_limit=connection_limit)
    raise ValueError(f"unknown provider {config.provider!r}")
