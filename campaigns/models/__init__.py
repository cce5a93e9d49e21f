"""Campaigns' models, one module per domain, re-exported here."""

from campaigns.models.broadcast import Broadcast
from campaigns.models.core import (
    EVENT_TYPE_NAME,
    ApiSource,
    Automation,
    Contact,
    EmailTemplate,
    EventType,
    Message,
    OutboxEvent,
    SeedList,
    TemplateVersion,
)
from campaigns.models.delivery import WarmupDay, WarmupSchedule

__all__ = [
    "EVENT_TYPE_NAME",
    "ApiSource",
    "Automation",
    "Broadcast",
    "Contact",
    "EmailTemplate",
    "EventType",
    "Message",
    "OutboxEvent",
    "SeedList",
    "TemplateVersion",
    "WarmupDay",
    "WarmupSchedule",
]
