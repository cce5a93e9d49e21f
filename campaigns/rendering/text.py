"""The plain-text side of an email: the text part derived from the sanitised HTML when a
version has none, tidying of text parts, and the one-line subject."""

from __future__ import annotations

import re
import unicodedata
from html.parser import HTMLParser

from campaigns.rendering.limits import MAX_SUBJECT_CHARS
from campaigns.rendering.sanitize import _REMOVED_WITH_CONTENT

_PARAGRAPH_TAGS = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "blockquote", "pre", "hr", "dl"}
)
_LINE_TAGS = frozenset({"div", "tr", "center", "dt", "dd", "caption"})


class _PlainTextWriter(HTMLParser):
    """Sanitised HTML to readable text: blocks and <br> become line breaks, list items
    "- item", links "text (url)"; entities are unescaped (convert_charrefs)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.links: list[tuple[str, int]] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
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
            self.links.append((attributes.get("href") or "", len(self.parts)))
        elif tag == "img" and attributes.get("alt"):
            self.parts.append(f" {attributes['alt']} ")

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
            self.parts.append(re.sub(r"\s+", " ", data))

    def text(self) -> str:
        return _tidy_text("\n".join(" ".join(line.split()) for line in "".join(self.parts).split("\n")))


def _html_to_text(html: str) -> str:
    writer = _PlainTextWriter()
    writer.feed(html)
    writer.close()
    return writer.text()


def _tidy_text(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def _clean_subject(subject: str) -> str:
    """One line: every control character and run of whitespace (CR, LF, U+2028, ...)
    becomes one space, so rendered data can never start a new header."""
    spaced = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in subject)
    return " ".join(spaced.split())[:MAX_SUBJECT_CHARS].strip()
