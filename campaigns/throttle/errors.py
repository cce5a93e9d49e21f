"""What the rate limit raises: every error means no token was taken."""

from __future__ import annotations


class ThrottleError(Exception):
    """Base class: no token was taken."""


class ThrottleTimeout(ThrottleError):
    """No token within `timeout`. `wait` is how long the bucket said the next try would
    need: requeue the messages with send_after = now + wait rather than spinning."""

    def __init__(self, *, bucket: str, wait: float, waited: float) -> None:
        super().__init__(f"rate limit {bucket!r}: no token within the timeout (next in {wait:.3f}s)")
        self.bucket = bucket
        self.wait = wait
        self.waited = waited


class ThrottleInTransaction(ThrottleError, RuntimeError):
    """acquire() was called inside a DB transaction: waiting there would hold row locks
    and a connection for as long as the rate limit says. Claim and commit first."""


class ThrottleUnavailable(ThrottleError):
    """The shared store (Redis, or the state file) could not be reached. Treat like a
    retryable send error: nothing left the building."""
