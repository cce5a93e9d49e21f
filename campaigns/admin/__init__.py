"""The marketer's admin for campaigns, one module per domain; importing them here is what
registers them (Django's autodiscovery imports campaigns.admin). Writes to versions, API
sources and automation activation go through campaigns.services, broadcasts' state changes
through campaigns.broadcasts; events and messages are read-only here, and their actions
only re-queue work (the workers do it after commit)."""

from campaigns.admin.automations import AutomationAdmin, AutomationForm, SeedListAdmin, SeedListForm
from campaigns.admin.broadcasts import BroadcastAdmin, BroadcastForm
from campaigns.admin.common import ExactSearchMixin
from campaigns.admin.contacts import ContactAdmin
from campaigns.admin.delivery import WarmupScheduleAdmin
from campaigns.admin.events import ApiSourceAdmin, EventTypeAdmin, OutboxEventAdmin
from campaigns.admin.messages import MessageAdmin
from campaigns.admin.templates import (
    EmailTemplateAdmin,
    TemplateVersionAdmin,
    TemplateVersionForm,
    TemplateVersionInline,
)

__all__ = [
    "ApiSourceAdmin",
    "AutomationAdmin",
    "AutomationForm",
    "BroadcastAdmin",
    "BroadcastForm",
    "ContactAdmin",
    "EmailTemplateAdmin",
    "EventTypeAdmin",
    "ExactSearchMixin",
    "MessageAdmin",
    "OutboxEventAdmin",
    "SeedListAdmin",
    "SeedListForm",
    "TemplateVersionAdmin",
    "TemplateVersionForm",
    "TemplateVersionInline",
    "WarmupScheduleAdmin",
]
