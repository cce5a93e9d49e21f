"""Safe rendering of marketer-edited email templates: a restricted Django template engine
(allowlisted tags and filters, plain-JSON data, no attribute access or method calls,
bounded work), an email-safe HTML sanitiser, the trusted layouts and the text part.

Marketers are trusted to write copy, not code. Everything a template can reach is the
plain-JSON context built by build_context() (context.py); everything it can do is listed
in _TAGS / _FILTERS (allowlist.py); everything it outputs as HTML goes through nh3
(sanitize.py). The limits and the render budget are in limits.py, the parser and the
compile step in engine.py, the text part in text.py, the entry points in render.py.
"""

from campaigns.rendering.context import ALLOWED_ROOTS, build_context
from campaigns.rendering.limits import (
    MAX_DECIMAL_PLACES,
    MAX_FILTER_RESULT,
    MAX_FORMAT_CHARS,
    MAX_LOOP_ITERATIONS,
    MAX_NESTING,
    MAX_OUTPUT_CHARS,
    MAX_PAD_WIDTH,
    MAX_SOURCE_CHARS,
    MAX_SUBJECT_CHARS,
    MAX_WORK,
    RENDER_DEADLINE_SECONDS,
)
from campaigns.rendering.render import (
    LAYOUT_LINKS,
    RenderedEmail,
    TemplateRejected,
    render_email,
    validate_template,
)

__all__ = [
    "ALLOWED_ROOTS",
    "LAYOUT_LINKS",
    "MAX_DECIMAL_PLACES",
    "MAX_FILTER_RESULT",
    "MAX_FORMAT_CHARS",
    "MAX_LOOP_ITERATIONS",
    "MAX_NESTING",
    "MAX_OUTPUT_CHARS",
    "MAX_PAD_WIDTH",
    "MAX_SOURCE_CHARS",
    "MAX_SUBJECT_CHARS",
    "MAX_WORK",
    "RENDER_DEADLINE_SECONDS",
    "RenderedEmail",
    "TemplateRejected",
    "build_context",
    "render_email",
    "validate_template",
]
