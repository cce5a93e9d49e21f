"""What a template can reach and do: variables that resolve dict keys and list indexes
only, and the allowlisted tags and filters (each charged to the render budget), gathered
into the one template Library the restricted engine uses."""

from __future__ import annotations

import functools
from datetime import date, datetime
from datetime import time as clock_time
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.template import Context, Library, TemplateSyntaxError, defaultfilters, defaulttags
from django.template.base import FilterExpression, Parser, Token, Variable, VariableDoesNotExist
from django.template.defaulttags import ForNode, NowNode
from django.utils import timezone
from django.utils.functional import Promise

from campaigns.rendering.limits import (
    MAX_DECIMAL_PLACES,
    MAX_FILTER_RESULT,
    MAX_FORMAT_CHARS,
    MAX_PAD_WIDTH,
    _charge,
    _charge_work,
    _LimitExceeded,
)

if TYPE_CHECKING:
    from campaigns.rendering.engine import _RestrictedParser


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# --- Data access: dict keys and list indexes, nothing else -----------------------------


_JSON_TYPES = (dict, list, tuple, str, int, float, bool, type(None))


class _JsonVariable(Variable):
    """A variable that resolves only dict keys and list indexes.

    Django's own Variable falls back to getattr() and calls whatever callable it finds,
    so {{ payload.items }}, {{ contact.email.upper }} or {{ payload.tags.pop }} would
    call dict/str/list methods. Here they simply do not exist (render as "").
    """

    __slots__ = ()

    def _resolve_lookup(self, context: Any) -> Any:
        current = context
        for bit in self.lookups or ():
            if current is context or isinstance(current, dict):
                try:
                    current = current[bit]
                except KeyError:
                    raise VariableDoesNotExist("No key [%s]", (bit,)) from None
            elif isinstance(current, list | tuple) and bit.isascii() and bit.isdigit():
                try:
                    current = current[int(bit)]
                except (IndexError, ValueError):
                    raise VariableDoesNotExist("No index [%s]", (bit,)) from None
            else:
                raise VariableDoesNotExist("No key [%s]", (bit,))
        if not isinstance(current, _JSON_TYPES):  # defence in depth: the data is JSON
            raise VariableDoesNotExist("Not JSON data [%s]", (self.var,))
        return current


class _CheckedFilterExpression(FilterExpression):
    """A FilterExpression whose variables are _JsonVariables, with the line it is on."""

    __slots__ = ("lineno",)

    def __init__(self, token: str, parser: _RestrictedParser) -> None:
        super().__init__(token, parser)
        self.lineno = parser.lineno
        constants = [self.var] if not self.is_var else []
        constants += [arg for _func, args in self.filters for lookup, arg in args if not lookup]
        if any(isinstance(constant, Promise) for constant in constants):
            raise TemplateSyntaxError("translated strings _(...) are not allowed")
        for variable in self.variables():
            if variable.translate:
                raise TemplateSyntaxError("translated strings _(...) are not allowed")
            # Same slots, so the class can be swapped in place: FilterExpression builds
            # its Variables itself and offers no hook to choose the class.
            variable.__class__ = _JsonVariable

    def variables(self) -> list[Variable]:
        found = [self.var] if self.is_var else []
        found += [arg for _func, args in self.filters for lookup, arg in args if lookup]
        return found


# --- Tags ----------------------------------------------------------------------------


class _CountedSequence:
    """Wraps a {% for %} sequence: charges its length to the loop budget and iterates
    only lists, strings and dict keys (anything else is an empty loop, not a crash)."""

    __slots__ = ("expression",)

    def __init__(self, expression: _CheckedFilterExpression) -> None:
        self.expression = expression

    def resolve(self, context: Context, ignore_failures: bool = False) -> Any:
        values = self.expression.resolve(context, ignore_failures=ignore_failures)
        if isinstance(values, dict):
            values = list(values)
        elif not isinstance(values, list | tuple | str):
            values = []
        _charge(iterations=len(values), lineno=self.expression.lineno)
        return values

    def __str__(self) -> str:
        return str(self.expression)


def _for_tag(parser: Parser, token: Token) -> ForNode:
    node = defaulttags.register.tags["for"](parser, token)
    node.sequence = _CountedSequence(node.sequence)
    return node


def _now_tag(parser: Parser, token: Token) -> NowNode:
    node = defaulttags.register.tags["now"](parser, token)
    if len(node.format_string) > MAX_FORMAT_CHARS:
        raise TemplateSyntaxError(f"the format of 'now' is longer than {MAX_FORMAT_CHARS} characters")
    return node


# Not allowed, and why:
#   load                    would add tag libraries (none are configured, but say so clearly)
#   include/extends/block   read other templates (files, admin templates) through loaders
#   ssi                     read files (removed from Django, still a classic payload)
#   debug                   dumps the whole context and sys.modules
#   autoescape, filter      switch escaping off / apply filters (safe) to whole blocks
#   url, csrf_token         reach the URLconf and the request: nothing an email needs
#   querystring             reads the request
#   templatetag, verbatim   print literal template syntax, for a downstream system
#                           (an ESP's merge tags, a preview tool) to interpret
#   lorem                   output size set by an argument ({% lorem 99999999 w %})
#   regroup                 resolves attribute paths on each item with its own lookup
#                           rules; group in the application, send the groups as payload
#   ifchanged               stores its state in the forloop dict under the node object,
#                           where {% for k in forloop %}{{ k }} would print its repr
_TAGS = {
    "if": defaulttags.register.tags["if"],
    "for": _for_tag,
    "with": defaulttags.register.tags["with"],
    "firstof": defaulttags.register.tags["firstof"],
    "cycle": defaulttags.register.tags["cycle"],
    "resetcycle": defaulttags.register.tags["resetcycle"],
    "comment": defaulttags.register.tags["comment"],
    "spaceless": defaulttags.register.tags["spaceless"],
    "widthratio": defaulttags.register.tags["widthratio"],
    "now": _now_tag,
}
_BLOCK_TAGS = frozenset({"if", "for", "with", "spaceless"})
_TAG_WORDS = frozenset(_TAGS) | {"elif", "else", "empty", "endcomment"} | {f"end{tag}" for tag in _BLOCK_TAGS}


# --- Filters -------------------------------------------------------------------------


def _guarded(func: Any) -> Any:
    """A filter that is charged to the budget, renders "" instead of raising (a filter
    given the wrong type of data, e.g. first on a dict), and whose oversized results
    render as "" (urlencode grows 3x per application, add 2x)."""

    @functools.wraps(func)  # keeps is_safe/needs_autoescape and, via __wrapped__, the signature
    def guarded(value: Any, *args: Any, **kwargs: Any) -> Any:
        _charge_work()
        try:
            result = func(value, *args, **kwargs)
        except _LimitExceeded:
            raise
        except Exception:
            return ""
        if isinstance(result, str | list) and len(result) > MAX_FILTER_RESULT:
            return ""
        return result

    return guarded


def _checked(name: str, allowed: Any) -> Any:
    """Django's filter `name`, refused (rendered "") when allowed(value, *args) is false:
    for arguments that would make it build a huge result before the size check."""
    original = defaultfilters.register.filters[name]

    @functools.wraps(original)
    def checked(value: Any, *args: Any, **kwargs: Any) -> Any:
        return original(value, *args, **kwargs) if allowed(value, *args) else ""

    return checked


def _decimal_places(arg: Any = -1) -> int:
    return abs(int(str(arg).rstrip("gu") or -1))


def _joined_length(value: Any, separator: Any) -> int:
    items = list(value)
    return sum(len(str(item)) for item in items) + len(str(separator)) * len(items)


def _from_iso(value: Any) -> Any:
    """The context is JSON, so dates arrive as ISO 8601 strings (DjangoJSONEncoder)."""
    if not isinstance(value, str):
        return value
    for parse in (
        date.fromisoformat if len(value) == 10 else datetime.fromisoformat,
        clock_time.fromisoformat,
    ):
        try:
            parsed = parse(value)
        except ValueError:
            continue
        if isinstance(parsed, datetime) and settings.USE_TZ and timezone.is_aware(parsed):
            parsed = timezone.localtime(parsed)  # as Django does for datetime objects
        return parsed
    return value


def _date_filter(name: str) -> Any:
    original = defaultfilters.register.filters[name]

    @functools.wraps(original)
    def formatted(value: Any, arg: Any = None) -> Any:
        if arg is not None and len(str(arg)) > MAX_FORMAT_CHARS:
            return ""
        return original(_from_iso(value), arg)

    return formatted


# Not allowed, and why:
#   safe, safeseq            mark data as HTML: the escape bypass
#   escape, force_escape,    useless (HTML is autoescaped; text parts are never HTML) and
#   escapeseq, escapejs      entity/JS noise in plain text; there is no JavaScript in email
#   pprint, stringformat     Python reprs ("%r"), and "%999999999d" builds a huge string
#   json_script              emits a <script> element marked safe
#   urlize, urlizetrunc,     build markup from data and mark it safe (and urlize has a
#   unordered_list           history of ReDoS fixes); unordered_list recurses into data
#   make_list                prints a Python list repr; no email use
#   dictsort, dictsortreversed  resolve "a.b" paths with getattr() on every item: sort in
#                            the application instead
#   random                   makes previews differ from sends
#   truncate*_html           for HTML input; context data is text
#   addslashes, get_digit, iriencode, linenumbers, phone2numeric, wordwrap,
#   timesince, timeuntil     no email use; fewer filters, less to review
_FILTERS = {
    **{
        name: defaultfilters.register.filters[name]
        for name in _names(
            """add capfirst cut default default_if_none divisibleby filesizeformat first last length
            linebreaks linebreaksbr lower pluralize slice slugify striptags title truncatechars
            truncatewords upper urlencode wordcount yesno"""
        )
    },
    **{
        name: _checked(name, lambda _value, width: int(width) <= MAX_PAD_WIDTH)
        for name in ("center", "ljust", "rjust")
    },
    "floatformat": _checked("floatformat", lambda _value, arg=-1: _decimal_places(arg) <= MAX_DECIMAL_PLACES),
    "join": _checked("join", lambda value, arg: _joined_length(value, arg) <= MAX_FILTER_RESULT),
    "date": _date_filter("date"),
    "time": _date_filter("time"),
}

_library = Library()
for _name, _compile_function in _TAGS.items():
    _library.tag(_name, _compile_function)
for _name, _filter in _FILTERS.items():
    _library.filter(_name, _guarded(_filter))
