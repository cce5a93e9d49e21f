"""The plain-text side of an email: the text part derived from the sanitised HTML when a
version has none, tidying of text parts, and the one-line subject."""

from __future__ import annotations

import re
import unicodedata
from html import unescape

from campaigns.rendering.limits import MAX_SUBJECT_CHARS
from campaigns.rendering.sanitize import _REMOVED_WITH_CONTENT

_PARAGRAPH_TAGS = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "blockquote", "pre", "hr", "dl"}
)
_LINE_TAGS = frozenset({"div", "tr", "center", "dt", "dd", "caption"})


# nh3's output, the only input _html_to_text() gets, is html5ever's serialisation:
# lower-case tag names, every attribute written name="value" with '"' and '&' escaped
# in the value, and '<' escaped in text. So this one pattern finds every tag, and the
# text between two tags holds no markup. (The stdlib's HTMLParser, used before, parses
# any HTML in Python code and took over half of render_email()'s time. The two gave the
# same text for 30,000 random sanitised fragments of tags, entities and links; the
# cases that matter are in tests/campaigns/test_rendering.py.)
_TAG = re.compile(r'<(/?)([a-z][a-z0-9]*)((?:\s+[^\s"\'>/=]+(?:="[^"]*")?)*)\s*(/?)>')
_ATTRIBUTE = re.compile(r'([^\s"\'>/=]+)(?:="([^"]*)")?')
_SPACES = re.compile(r"\s+")


class _PlainTextWriter:
    """Sanitised HTML to readable text: blocks and <br> become line breaks, list items
    "- item", links "text (url)"; entities are unescaped."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.links: list[tuple[str, int]] = []
        self.skipping = 0

    def feed(self, html: str) -> None:
        position = 0
        for tag in _TAG.finditer(html):
            if tag.start() > position:
                self.handle_data(unescape(html[position : tag.start()]))
            position = tag.end()
            closing, name, attributes, self_closing = tag.groups()
            if closing:
                self.handle_endtag(name)
                continue
            self.handle_starttag(name, attributes)
            if self_closing:
                self.handle_endtag(name)
        if position < len(html):
            self.handle_data(unescape(html[position:]))

    def handle_starttag(self, tag: str, attribute_text: str) -> None:
        if tag in _REMOVED_WITH_CONTENT:
            self.skipping += 1
        elif tag == "br":
            self.parts.append("\n")
        elif tag in _PARAGRAPH_TAGS:
            self.parts.append("\n\n")
        elif tag in _LINE_TAGS:
            self.parts.append("\n")
        elif tag == "li":
            self.parts.append("\n- ")
        elif tag in ("td", "th"):
            self.parts.append(" ")
        elif tag == "a":
            self.links.append((_attribute(attribute_text, "href"), len(self.parts)))
        elif tag == "img" and (alt := _attribute(attribute_text, "alt")):
            self.parts.append(f" {alt} ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _REMOVED_WITH_CONTENT:
            self.skipping = max(self.skipping - 1, 0)
        elif tag in _PARAGRAPH_TAGS:
            self.parts.append("\n\n")
        elif tag in _LINE_TAGS:
            self.parts.append("\n")
        elif tag == "a" and self.links:
            href, start = self.links.pop()
            label = " ".join("".join(self.parts[start:]).split())
            if href and href not in label and href.removeprefix("mailto:") != label:
                label = f"{label} ({href})" if label else href
            self.parts[start:] = [label]

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(_SPACES.sub(" ", data))

    def text(self) -> str:
        return _tidy_text("\n".join(" ".join(line.split()) for line in "".join(self.parts).split("\n")))


def _attribute(attribute_text: str, name: str) -> str:
    """One attribute's unescaped value ("" when absent or empty); the first wins, as in
    a browser."""
    if name not in attribute_text:
        return ""
    for found in _ATTRIBUTE.finditer(attribute_text):
        if found.group(1).lower() == name:
            return unescape(found.group(2) or "")
    return ""


def _html_to_text(html: str) -> str:
    writer = _PlainTextWriter()
    writer.feed(html)
    return writer.text()


def _tidy_text(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def _clean_subject(subject: str) -> str:
    """One line: every control character and run of whitespace (CR, LF, U+2028, ...)
    becomes one space, so rendered data can never start a new header."""
    spaced = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in subject)
    return " ".join(spaced.split())[:MAX_SUBJECT_CHARS].strip()
