"""The email-safe HTML subset: what nh3 keeps of a rendered HTML part (tags, attributes,
style properties and URL schemes), and the sanitiser itself."""

from __future__ import annotations

import re

import nh3


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


_EMAIL_TAGS = _names(
    """a abbr b blockquote br caption center code col colgroup dd del div dl dt em font
    h1 h2 h3 h4 h5 h6 hr i img ins li ol p pre s small span strike strong sub sup
    table tbody td tfoot th thead tr u ul"""
)
# Removed with their content; every other tag not in _EMAIL_TAGS (form, input, ...) is
# removed and its text kept.
_REMOVED_WITH_CONTENT = _names(
    "script style iframe object embed noscript template textarea select svg math title"
)
_EMAIL_ATTRIBUTES = {
    # No class/id: there is no marketer stylesheet, and they could target the layout's.
    "*": {"style", "align", "valign", "width", "height", "bgcolor", "dir", "lang", "title"},
    "a": {"href", "target"},
    "img": {"src", "alt", "border"},
    "table": {"border", "cellpadding", "cellspacing", "role"},
    "td": {"colspan", "rowspan", "nowrap"},
    "th": {"colspan", "rowspan", "nowrap", "scope"},
    "col": {"span"},
    "colgroup": {"span"},
    "font": {"color", "face", "size"},
    "ol": {"start", "type"},
    "ul": {"type"},
    "li": {"value"},
}
# Layout and typography only. Left out: background(-image), list-style(-image),
# border-image, content, cursor (all take url(): remote loads, tracking); position, top,
# left, z-index, transform (overlay content over the layout's unsubscribe link);
# behavior, -moz-binding, filter (legacy script hooks).
_EMAIL_STYLE_PROPERTIES = _names(
    """color background-color font font-family font-size font-style font-variant font-weight
    letter-spacing line-height text-align text-decoration text-indent text-transform
    white-space word-break word-spacing vertical-align direction
    margin margin-top margin-right margin-bottom margin-left
    padding padding-top padding-right padding-bottom padding-left
    border border-top border-right border-bottom border-left border-color border-style
    border-width border-radius border-collapse border-spacing
    width height max-width min-width max-height min-height display table-layout list-style-type"""
)
# nh3 filters style declarations by property name only: it keeps
# "width:expression(alert(1))" (checked with nh3 0.3.8). Its attribute_filter runs on
# the raw attribute before that, so a style with any of these is dropped as a whole.
_STYLE_RED_FLAGS = ("url(", "expression(", "javascript:", "\\", "@import", "/*")
_URL_PREFIXES = {"href": ("https://", "http://", "mailto:"), "src": ("https://", "http://")}


_STYLE_RED_FLAG = re.compile("|".join(re.escape(flag) for flag in _STYLE_RED_FLAGS))


def _filter_attribute(tag: str, attribute: str, value: str) -> str | None:
    # Called by nh3 for every kept attribute (dozens per email): one regex search on
    # the lower-cased value rather than a lower() per red flag.
    if attribute == "style":
        return None if _STYLE_RED_FLAG.search(value.lower()) else value
    # nh3's url_schemes is one list for every URL attribute: mailto: must not be an image.
    prefixes = _URL_PREFIXES.get(attribute)
    if prefixes is not None and not value.strip().lower().startswith(prefixes):
        return None
    return value


# Argument names and semantics: nh3.Cleaner's docstring (nh3 0.3.8,
# https://nh3.readthedocs.io/en/latest/#nh3.Cleaner). One Cleaner built at import: the
# same options as nh3.clean() with them, without rebuilding the rule set per email.
_CLEANER = nh3.Cleaner(
    tags=set(_EMAIL_TAGS),
    clean_content_tags=set(_REMOVED_WITH_CONTENT),
    attributes={tag: set(names) for tag, names in _EMAIL_ATTRIBUTES.items()},
    attribute_filter=_filter_attribute,
    url_schemes={"http", "https", "mailto"},
    url_relative="deny",  # a relative URL means nothing in a mailbox
    link_rel="noopener noreferrer",
    filter_style_properties=set(_EMAIL_STYLE_PROPERTIES),
    strip_comments=True,  # also drops Outlook's <!--[if mso]> blocks
)


def _sanitize_email_html(html: str) -> str:
    return _CLEANER.clean(html)
