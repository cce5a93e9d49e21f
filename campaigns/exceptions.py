"""The exceptions that application code calling campaigns.emit()/identify() can see."""

from __future__ import annotations


class InvalidInput(ValueError):
    """Input was rejected; nothing was written.

    `errors` maps a field path ("payload.plan", "event_type", "email") to what is wrong
    with it, so that the events API can return a field-level 400 body.
    """

    def __init__(self, message: str, *, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.errors: dict[str, str] = errors or {}


class InvalidEvent(InvalidInput):
    """emit() refused an event: unknown or inactive type, or a payload that does not fit."""


class InvalidContact(InvalidInput):
    """identify() refused a contact: a bad email address or attributes."""
