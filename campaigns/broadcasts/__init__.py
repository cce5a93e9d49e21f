"""Broadcasts: one-off campaigns to a rule-defined audience (campaigns.models.Broadcast).

- selectors.py: who is in an audience, who gets a message, the preview and the counts;
- services.py: the state changes a marketer makes (create, schedule, send now, pause,
  resume, cancel);
- materialise.py: turning a sending broadcast's audience into Message rows, a batch per
  transaction;
- sweep.py: the housekeeping pass (start due broadcasts, materialise, cancel, finish,
  refresh counts).

The audience rule's validation lives with the rule language (campaigns.rules), so the
model can check it without importing services. Other modules import from here.
"""

from campaigns.broadcasts.materialise import (
    BATCH_SIZE,
    BROADCAST_PRIORITY,
    MaterialiseBatch,
    broadcast_materialise_batch,
)
from campaigns.broadcasts.selectors import (
    AudiencePreview,
    audience_candidates,
    audience_matches,
    audience_preview,
    broadcast_message_counts,
    broadcast_new_recipients,
    broadcasts_waiting,
    template_event_fields,
)
from campaigns.broadcasts.services import (
    CANCELLABLE,
    broadcast_cancel,
    broadcast_create,
    broadcast_pause,
    broadcast_pause_if_sending,
    broadcast_resume,
    broadcast_schedule,
    broadcast_send_now,
    nudge_broadcast_workers,
)
from campaigns.broadcasts.sweep import (
    BroadcastSweep,
    broadcasts_finish,
    broadcasts_start_due,
    broadcasts_stats_refresh,
    broadcasts_sweep,
)
from campaigns.rules import AUDIENCE_LOCATION, AudienceError, audience_validate

__all__ = [
    "AUDIENCE_LOCATION",
    "BATCH_SIZE",
    "BROADCAST_PRIORITY",
    "CANCELLABLE",
    "AudienceError",
    "AudiencePreview",
    "BroadcastSweep",
    "MaterialiseBatch",
    "audience_candidates",
    "audience_matches",
    "audience_preview",
    "audience_validate",
    "broadcast_cancel",
    "broadcast_create",
    "broadcast_materialise_batch",
    "broadcast_message_counts",
    "broadcast_new_recipients",
    "broadcast_pause",
    "broadcast_pause_if_sending",
    "broadcast_resume",
    "broadcast_schedule",
    "broadcast_send_now",
    "broadcasts_finish",
    "broadcasts_start_due",
    "broadcasts_stats_refresh",
    "broadcasts_sweep",
    "broadcasts_waiting",
    "nudge_broadcast_workers",
    "template_event_fields",
]
