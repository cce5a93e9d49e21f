"""Structured log lines: the standard fields plus the ids passed in `extra=`.

Services log ids (outbox row ids, message ids, esp_message_id, counts), never addresses
or payloads, so a log line can be shipped anywhere without leaking personal data. These
formatters make those extras visible, as JSON (LOG_FORMAT=json) or key=value, and print
tracebacks without the exceptions' messages (exception_without_message).
"""

from __future__ import annotations

import json
import logging
import traceback
from types import TracebackType
from typing import Any

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def exception_without_message(ei: ExcInfo) -> str:
    """A traceback (where it happened, for every exception in the chain) without the
    exceptions' messages: a database error quotes the row it refused ('Key (email)=(…)
    already exists'), a validation error the value it refused. The message stays where
    the admin shows it (an event's or message's error history), not in a log line."""
    exc_type, exc, _tb = ei
    if exc_type is None or exc is None:
        return ""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    parts = []
    for link in reversed(chain):
        kind = type(link)
        parts.append(
            "Traceback (most recent call last):\n"
            + "".join(traceback.format_tb(link.__traceback__))
            + f"{kind.__module__}.{kind.__qualname__} (message not logged: it may quote personal data)"
        )
    return "\n\nwhich led to:\n\n".join(parts)


class _NoMessageInTracebacks(logging.Formatter):
    def formatException(self, ei: Any) -> str:
        return exception_without_message(ei)

    def format(self, record: logging.LogRecord) -> str:
        # logging.Formatter.format reuses record.exc_text, which another handler's
        # formatter may have filled with the full message: format it ourselves.
        cached, record.exc_text = record.exc_text, None
        try:
            return self._format(record)
        finally:
            record.exc_text = cached

    def _format(self, record: logging.LogRecord) -> str:
        return super().format(record)


class JsonFormatter(_NoMessageInTracebacks):
    def _format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class KeyValueFormatter(_NoMessageInTracebacks):
    def _format(self, record: logging.LogRecord) -> str:
        line = super()._format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in extras.items())
        return line
