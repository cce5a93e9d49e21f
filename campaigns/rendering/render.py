"""The public entry points: validate_template() when a version is saved, render_email()
for each recipient. They compile every part, report problems as TemplateRejected ("html,
line 3: ..."), and wrap the rendered parts in the trusted layouts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.template import Context
from django.utils.safestring import mark_safe

from campaigns.rendering.context import ALLOWED_ROOTS, _plain_json
from campaigns.rendering.engine import _compile, _Compiled, _CompileFailed
from campaigns.rendering.layout import LAYOUT_LINKS, render_layout
from campaigns.rendering.limits import _BUDGET, _LimitExceeded, _RenderBudget
from campaigns.rendering.sanitize import _sanitize_email_html
from campaigns.rendering.text import _clean_subject, _html_to_text, _tidy_text


class TemplateRejected(Exception):
    """A template (or one render of it) that must not be used. Each message names the
    part and the line: "html, line 3: the filter 'safe' is not allowed"."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))

    def __str__(self) -> str:
        return "; ".join(self.errors)


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    html: str
    text: str


def _compile_parts(*, subject: str, html: str, text: str) -> dict[str, _Compiled]:
    """Compile every part (text only when given), reporting the problems of all parts."""
    errors = []
    if not subject.strip():
        errors.append("subject, line 1: the subject is empty")
    compiled = {}
    for part, source in (("subject", subject), ("html", html), ("text", text)):
        if part == "text" and not source.strip():
            continue
        try:
            compiled[part] = _compile(source)
        except _CompileFailed as failed:
            problems = dict.fromkeys(sorted(failed.problems, key=lambda problem: problem[0]))
            errors += [f"{part}, line {line}: {message}" for line, message in problems]
    if errors:
        raise TemplateRejected(errors)
    return compiled


def validate_template(*, subject: str, html: str, text: str = "") -> set[str]:
    """Compile the parts with the restricted engine; return the data paths they use
    ({"contact.first_name", "payload.items.name"}: loop and {% with %} variables are
    expanded to the data they stand for, list indexes are left out). A path to an
    object ("payload.address") exposes everything below it."""
    compiled = _compile_parts(subject=subject, html=html, text=text)
    return set().union(*(part.paths for part in compiled.values()))


# --- Rendering -----------------------------------------------------------------------


def _render_part(part: str, compiled: _Compiled, data: dict[str, Any], *, autoescape: bool) -> str:
    try:
        # A copy per part: "{% now 'Y' as payload %}" writes into the top dict.
        return compiled.template.render(Context(dict(data), autoescape=autoescape))
    except Exception as err:
        line = getattr(err, "lineno", None) or getattr(err, "template_debug", {}).get("line") or 1
        message = (
            str(err) if isinstance(err, _LimitExceeded) else f"could not be rendered: {str(err).strip()}"
        )
        raise TemplateRejected([f"{part}, line {line}: {message}"]) from err


def _layout_links(links: Any) -> dict[str, str]:
    """The links the layout shows: only http(s) URLs, whatever the caller passed."""
    if not isinstance(links, dict):
        return {}
    return {
        name: url
        for name in LAYOUT_LINKS
        if isinstance(url := links.get(name), str) and url.lower().startswith(("https://", "http://"))
    }


def render_email(*, subject: str, html: str, text: str = "", context: dict[str, Any]) -> RenderedEmail:
    """Render a template version for one recipient. Raises TemplateRejected when the
    template is invalid or exceeds a render limit; TypeError when the context is not
    plain JSON (build it with build_context)."""
    compiled = _compile_parts(subject=subject, html=html, text=text)
    data = {root: _plain_json(context.get(root) or {}) for root in ALLOWED_ROOTS}
    budget_token = _BUDGET.set(_RenderBudget())
    try:
        subject_line = _clean_subject(_render_part("subject", compiled["subject"], data, autoescape=False))
        body_html = _sanitize_email_html(_render_part("html", compiled["html"], data, autoescape=True))
        if "text" in compiled:
            # Autoescape off: text/plain is never interpreted as HTML.
            body_text = _tidy_text(_render_part("text", compiled["text"], data, autoescape=False))
        else:
            body_text = _html_to_text(body_html)
    finally:
        _BUDGET.reset(budget_token)
    links = _layout_links(data["links"])
    layout = {"subject": subject_line, "links": links}
    return RenderedEmail(
        subject=subject_line,
        # mark_safe: body_html is the output of _sanitize_email_html, just above.
        html=render_layout("email/layout.html", {**layout, "body": mark_safe(body_html)}),  # noqa: S308
        text=_tidy_text(render_layout("email/layout.txt", {**layout, "body": body_text})) + "\n",
    )
