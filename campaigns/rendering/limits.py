"""How much work one email may cost to render: the size limits, and the per-render budget
that every node render and filter call is charged to."""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import Any

# --- Limits --------------------------------------------------------------------------
# Django has no render time limit and cannot interrupt a running filter, so work is
# bounded cooperatively: every node render and filter call is charged to a per-email
# budget that also checks a wall-clock deadline. What stays unbounded is the duration
# of one single step between two checks: one filter call on an input of at most
# MAX_FILTER_RESULT characters (or on one value from the data, whose size the
# application controls), one `{% if %}` expression, and nh3 / the text conversion on at
# most MAX_OUTPUT_CHARS. The Celery task time limit is the backstop for those.
MAX_SOURCE_CHARS = 200_000  # per part
MAX_NESTING = 20  # block tags inside block tags
MAX_LOOP_ITERATIONS = 10_000  # per email, all loops together
MAX_WORK = 200_000  # node renders + filter calls, per email
MAX_OUTPUT_CHARS = 1_000_000  # per email, before sanitising (Gmail clips at ~100 KB)
MAX_FILTER_RESULT = 100_000  # a longer filter result renders as ""
MAX_PAD_WIDTH = 1_000  # center / ljust / rjust
MAX_DECIMAL_PLACES = 20  # floatformat:999999 would build a 1 MB string
MAX_FORMAT_CHARS = 100  # date / time filters and {% now %}: "rrrr…" expands 31x
RENDER_DEADLINE_SECONDS = 5.0
MAX_SUBJECT_CHARS = 998  # RFC 5322 section 2.1.1 line length limit


# --- Render budget -----------------------------------------------------------------


class _LimitExceeded(Exception):
    def __init__(self, message: str, lineno: int | None) -> None:
        super().__init__(message)
        self.lineno = lineno


class _RenderBudget:
    """Work done by one render_email() call. Once exceeded it stays exceeded, so that an
    {% if %} (whose operators swallow exceptions) cannot carry on past the limit."""

    def __init__(self) -> None:
        self.work = self.output = self.iterations = 0
        self.deadline = time.monotonic() + RENDER_DEADLINE_SECONDS
        self.exceeded: str | None = None

    def charge(
        self, *, work: int = 0, output: int = 0, iterations: int = 0, lineno: int | None = None
    ) -> None:
        if self.exceeded is None:
            self.work += work
            self.output += output
            self.iterations += iterations
            if self.iterations > MAX_LOOP_ITERATIONS:
                self.exceeded = f"more than {MAX_LOOP_ITERATIONS:,} loop iterations"
            elif self.output > MAX_OUTPUT_CHARS:
                self.exceeded = f"more than {MAX_OUTPUT_CHARS:,} characters of output"
            elif self.work > MAX_WORK:
                self.exceeded = f"more than {MAX_WORK:,} tags, variables and filters evaluated"
            elif time.monotonic() > self.deadline:
                self.exceeded = f"rendering took longer than {RENDER_DEADLINE_SECONDS:g} seconds"
        if self.exceeded is not None:
            raise _LimitExceeded(f"the template is too expensive to render: {self.exceeded}", lineno)

    # charge(work=1) and charge(output=n), for the hot paths (every node render, every
    # filter call). The same checks in the same order: while nothing is exceeded every
    # counter is within its limit, so only the counter that grows and the deadline can
    # change the outcome.
    def charge_work(self, lineno: int | None = None) -> None:
        if self.exceeded is None:
            self.work += 1
            if self.work > MAX_WORK:
                self.exceeded = f"more than {MAX_WORK:,} tags, variables and filters evaluated"
            elif time.monotonic() > self.deadline:
                self.exceeded = f"rendering took longer than {RENDER_DEADLINE_SECONDS:g} seconds"
        if self.exceeded is not None:
            raise _LimitExceeded(f"the template is too expensive to render: {self.exceeded}", lineno)

    def charge_output(self, output: int, lineno: int | None = None) -> None:
        if self.exceeded is None:
            self.output += output
            if self.output > MAX_OUTPUT_CHARS:
                self.exceeded = f"more than {MAX_OUTPUT_CHARS:,} characters of output"
            elif time.monotonic() > self.deadline:
                self.exceeded = f"rendering took longer than {RENDER_DEADLINE_SECONDS:g} seconds"
        if self.exceeded is not None:
            raise _LimitExceeded(f"the template is too expensive to render: {self.exceeded}", lineno)


# A context variable rather than an argument: filters are called by Django without the
# template context, and must still be charged.
_BUDGET: ContextVar[_RenderBudget | None] = ContextVar("mailauto_render_budget", default=None)


def _charge(**amounts: Any) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.charge(**amounts)


def _charge_work() -> None:
    """_charge(work=1), without the keyword packing: every filter call."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.charge_work()
