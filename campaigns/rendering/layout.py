"""The trusted layouts around every email (templates/email/layout.html and .txt), rendered
by Django's own engine once per shape and then filled in for each recipient.

A layout only prints `subject`, `body` and `links.<name>` and tests whether they are set.
Its output for one recipient is therefore fixed by which of those are set: Django renders
it once per such shape with a marker in place of each value, and each email is that
output with the markers replaced by the values, escaped wherever Django escaped the
marker (found out by putting an "&" in it). A layout that does anything else with the
values (a filter, a comparison, another tag) is rendered by Django for every email, as
before. Shapes are kept per compiled layout, so they last as long as Django's cached
template loader keeps it (until the autoreloader resets it in development).
"""

from __future__ import annotations

import re
import weakref
from typing import Any

from django.template.base import Template, TextNode, Variable, VariableNode
from django.template.defaulttags import AutoEscapeControlNode, CommentNode, IfNode, TemplateLiteral
from django.template.loader import get_template
from django.utils.html import conditional_escape

LAYOUT_LINKS = ("unsubscribe_url", "preferences_url", "view_in_browser_url")

# Every value a layout may print, by its lookup path.
_SLOTS: tuple[tuple[str, ...], ...] = (
    ("subject",),
    ("body",),
    *(("links", name) for name in LAYOUT_LINKS),
)
_SLOT_INDEX = {path: index for index, path in enumerate(_SLOTS)}
# NUL never survives into a rendered layout otherwise: nothing here writes one and the
# layout files hold none (checked when a shape is built).
_MARKER = "\x00mailauto-layout-slot-{}&\x00"
_MARKERS = re.compile("\x00mailauto-layout-slot-(\\d+)(&|&amp;)\x00")
_MISSING = object()

# Per compiled layout (a new object when Django reloads the file): None if it cannot be
# filled in, else its shapes, each a list of literal text and (slot, escaped) pairs.
_Parts = list[str | tuple[int, bool]]
_SHAPES: weakref.WeakKeyDictionary[Template, dict[tuple[Any, ...], _Parts] | None] = (
    weakref.WeakKeyDictionary()
)


def render_layout(name: str, context: dict[str, Any]) -> str:
    """render_to_string(name, context) for a layout, context = {"subject", "body",
    "links"}: the same string, without running the template for every email."""
    template = get_template(name)
    compiled = getattr(template, "template", None)
    values = _slot_values(context)
    if not isinstance(compiled, Template) or values is None:
        return template.render(context)
    if compiled not in _SHAPES:
        _SHAPES[compiled] = {} if _fillable(compiled.nodelist) else None
    shapes = _SHAPES[compiled]
    if shapes is None:
        return template.render(context)
    # A set value is a marker in the shape; an unset one is part of the shape's key,
    # so that "" and a missing link each render exactly as Django renders them.
    key = tuple(value if value is _MISSING or not value else True for value in values)
    parts = shapes.get(key)
    if parts is None:
        parts = _shape(template, values)
        if parts is None:
            return template.render(context)
        shapes[key] = parts
    return "".join(
        part
        if isinstance(part, str)
        else (conditional_escape(values[part[0]]) if part[1] else values[part[0]])
        for part in parts
    )


def _slot_values(context: dict[str, Any]) -> list[Any] | None:
    """The value of each slot (_MISSING when absent), or None when one is neither a
    string nor None (Django would print its str(), localised: not worth copying)."""
    if set(context) - {"subject", "body", "links"}:
        return None
    links = context.get("links")
    if not isinstance(links, dict):
        return None
    values: list[Any] = []
    for path in _SLOTS:
        value = links.get(path[1], _MISSING) if path[0] == "links" else context.get(path[0], _MISSING)
        if not (value is _MISSING or value is None or isinstance(value, str)):
            return None
        values.append(value)
    return values


def _shape(template: Any, values: list[Any]) -> _Parts | None:
    """Render the layout once with a marker for every set value and split the output
    around the markers."""
    probe: dict[str, Any] = {"links": {}}
    for index, (path, value) in enumerate(zip(_SLOTS, values, strict=True)):
        if value is _MISSING:
            continue
        marker = _MARKER.format(index) if value else value
        if path[0] == "links":
            probe["links"][path[1]] = marker
        else:
            probe[path[0]] = marker
    output = template.render(probe)
    parts: _Parts = []
    position = 0
    for match in _MARKERS.finditer(output):
        parts.append(output[position : match.start()])
        parts.append((int(match.group(1)), match.group(2) == "&amp;"))
        position = match.end()
    parts.append(output[position:])
    if any(isinstance(part, str) and "\x00" in part for part in parts):
        return None  # a marker Django changed after all: do not guess
    return [part for part in parts if part != ""]


def _fillable(nodelist: Any) -> bool:
    """True when the layout only prints slots unfiltered and tests them for truth."""
    for node in nodelist:
        if isinstance(node, TextNode | CommentNode):
            continue
        if isinstance(node, VariableNode):
            if not _plain_slot(node.filter_expression):
                return False
        elif isinstance(node, IfNode):
            for condition, branch in node.conditions_nodelists:
                if condition is not None and not _truth_test(condition):
                    return False
                if not _fillable(branch):
                    return False
        elif isinstance(node, AutoEscapeControlNode):
            if not _fillable(node.nodelist):
                return False
        else:
            return False
    return True


def _plain_slot(expression: Any) -> bool:
    variable = getattr(expression, "var", None)
    return (
        not expression.filters
        and isinstance(variable, Variable)
        and variable.lookups is not None
        and tuple(variable.lookups) in _SLOT_INDEX
    )


def _truth_test(condition: Any) -> bool:
    """An {% if %} condition made of slots joined by and / or / not."""
    if isinstance(condition, TemplateLiteral):
        return _plain_slot(condition.value)
    if condition.id == "not":
        return _truth_test(condition.first)
    if condition.id in ("and", "or"):
        return _truth_test(condition.first) and _truth_test(condition.second)
    return False
