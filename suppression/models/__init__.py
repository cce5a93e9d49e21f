"""Suppression's models, one module per concern, re-exported here."""

from suppression.models.suppression import Suppression, SuppressionLogEntry

__all__ = ["Suppression", "SuppressionLogEntry"]
