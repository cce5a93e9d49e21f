"""Suppression's models, one module per concern, re-exported here."""

from suppression.models.consent import AuditLogEntry, ConsentNotice, ConsentRecord, HashedSuppression
from suppression.models.preferences import Topic
from suppression.models.suppression import Suppression, SuppressionLogEntry

__all__ = [
    "AuditLogEntry",
    "ConsentNotice",
    "ConsentRecord",
    "HashedSuppression",
    "Suppression",
    "SuppressionLogEntry",
    "Topic",
]
