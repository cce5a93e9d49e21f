"""Safe rendering of marketer-edited email templates: a restricted Django template engine
(allowlisted tags and filters, plain-JSON data, no attribute access or method calls,
bounded work), an email-safe HTML sanitiser, the trusted layouts and the text part.

Marketers are trusted to write copy, not code. Everything a template can reach is the
plain-JSON context built by build_context(); everything it can do is listed in
_TAGS / _FILTERS below; everything it outputs as HTML goes through nh3.
"""

from __future__ import annotations

import functools
import json
import re
import time
import unicodedata
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as clock_time
from html.parser import HTMLParser
from typing import Any, ClassVar, cast

import nh3
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.template import Context, Engine, Library, TemplateSyntaxError, defaultfilters, defaulttags
from django.template.base import (
    DebugLexer,
    FilterExpression,
    Node,
    Parser,
    Template,
    TextNode,
    Token,
    TokenType,
    Variable,
    VariableDoesNotExist,
    VariableNode,
)
from django.template.defaulttags import (
    CommentNode,
    CycleNode,
    FirstOfNode,
    ForNode,
    IfNode,
    NowNode,
    ResetCycleNode,
    SpacelessNode,
    TemplateLiteral,
    WidthRatioNode,
    WithNode,
)
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.functional import Promise
from django.utils.safestring import mark_safe

ALLOWED_ROOTS = ("contact", "event", "payload", "links")
LAYOUT_LINKS = ("unsubscribe_url", "preferences_url", "view_in_browser_url")


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


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


# A context variable rather than an argument: filters are called by Django without the
# template context, and must still be charged.
_BUDGET: ContextVar[_RenderBudget | None] = ContextVar("mailauto_render_budget", default=None)


def _charge(**amounts: Any) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.charge(**amounts)


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
        _charge(work=1)
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


# --- Nodes: every node render is charged ----------------------------------------------

_OUTPUT_NODES = (TextNode, VariableNode, CycleNode, FirstOfNode, NowNode, WidthRatioNode)


class _BudgetedNode(Node):
    def render_annotated(self, context: Context) -> str:
        lineno = self.token.lineno if self.token is not None else None
        _charge(work=1, lineno=lineno)
        output = cast(str, super().render_annotated(context))
        if isinstance(self, _OUTPUT_NODES):  # containers' output is their children's
            _charge(output=len(output), lineno=lineno)
        return output


_BUDGETED_CLASSES: dict[type[Node], type[Node]] = {}


def _budgeted_class(cls: type[Node]) -> type[Node]:
    if cls not in _BUDGETED_CLASSES:
        _BUDGETED_CLASSES[cls] = type(
            f"Budgeted{cls.__name__}", (_BudgetedNode, cls), {"__module__": __name__}
        )
    return _BUDGETED_CLASSES[cls]


# --- Compilation -----------------------------------------------------------------------


class _CompileFailed(Exception):
    def __init__(self, problems: list[tuple[int, str]]) -> None:
        super().__init__(problems)
        self.problems = problems


def _rejected_filter(value: Any, arg: Any = None) -> str:
    return ""


class _RestrictedParser(Parser):
    """Django's parser with: the current line tracked, disallowed filters collected
    (so that one save reports all of them), clearer messages, and budgeted nodes."""

    def __init__(self, tokens: list[Token], libraries: Any, builtins: Any, origin: Any) -> None:
        super().__init__(tokens, libraries, builtins, origin)
        self.lineno = 1
        self.problems: list[tuple[int, str]] = []

    def next_token(self) -> Token:
        token = super().next_token()
        self.lineno = token.lineno or self.lineno
        return token

    def compile_filter(self, token: str) -> _CheckedFilterExpression:
        return _CheckedFilterExpression(token, self)

    def find_filter(self, filter_name: str) -> Any:
        if filter_name in self.filters:
            return self.filters[filter_name]
        self.problems.append((self.lineno, f"the filter '{filter_name}' is not allowed"))
        return _rejected_filter

    def invalid_block_tag(self, token: Token, command: str, parse_until: Any = None) -> None:
        expected = f", expected {' or '.join(repr(p) for p in parse_until)}" if parse_until else ""
        raise self.error(token, f"unexpected tag '{command}'{expected}")

    def unclosed_block_tag(self, parse_until: Any) -> None:
        command, token = self.command_stack.pop()
        raise self.error(token, f"unclosed tag '{command}'")

    def extend_nodelist(self, nodelist: Any, node: Node, token: Token) -> None:
        # Tags build their nodes themselves; swapping the class here, where every node
        # passes, is the one place to make all of them charge the budget.
        node.__class__ = _budgeted_class(type(node))
        super().extend_nodelist(nodelist, node, token)


def _prescan(tokens: list[Token]) -> list[tuple[int, str]]:
    """Disallowed tags (all of them, not just the first) and nesting depth, before the
    recursive parser sees a 10,000-deep {% if %}."""
    problems = []
    depth = 0
    in_comment = False
    for token in tokens:
        if token.token_type != TokenType.BLOCK or not token.contents.split():
            continue
        command = token.contents.split()[0]
        if in_comment:  # as Parser.skip_past("endcomment")
            in_comment = token.contents != "endcomment"
        elif command == "comment":
            in_comment = True
        elif command not in _TAG_WORDS:
            if not command.startswith("end"):  # {% endautoescape %}: its opener is reported
                problems.append((token.lineno or 1, f"the tag '{command}' is not allowed"))
        elif command in _BLOCK_TAGS:
            depth += 1
            if depth > MAX_NESTING:
                problems.append((token.lineno or 1, f"tags are nested more than {MAX_NESTING} deep"))
                break
        elif command.startswith("end"):
            depth = max(depth - 1, 0)
    return problems


class _RestrictedTemplate(Template):
    def compile_nodelist(self) -> Any:
        # As Template.compile_nodelist, with our parser. DebugLexer because the engine
        # runs with debug=True: render errors then carry the line of the failing node
        # (exception.template_debug), which needs token positions.
        tokens = DebugLexer(self.source).tokenize()
        problems = _prescan(tokens)
        if problems:
            raise _CompileFailed(problems)
        parser = _RestrictedParser(
            tokens, self.engine.template_libraries, self.engine.template_builtins, self.origin
        )
        try:
            nodelist = parser.parse()
        except RecursionError:
            raise _CompileFailed(
                [*parser.problems, (parser.lineno, "the template is nested too deeply")]
            ) from None
        except Exception as err:
            token = getattr(err, "token", None)
            line = token.lineno if token is not None else parser.lineno
            message = re.sub(r" on line \d+", "", str(err)).strip()
            raise _CompileFailed([*parser.problems, (line, message)]) from err
        if parser.problems:
            raise _CompileFailed(parser.problems)
        self.extra_data = parser.extra_data
        return nodelist


class _RestrictedEngine(Engine):
    # Engine() always prepends defaulttags, defaultfilters and loader_tags to the
    # builtins; here the allowlisted library is the only one.
    default_builtins: ClassVar[list[str]] = []

    def get_template_builtins(self, builtins: Any) -> list[Library]:
        return [_library]


_ENGINE = _RestrictedEngine(
    dirs=[],
    app_dirs=False,
    loaders=[],  # no include/extends can reach a file, even if the tags were allowed
    libraries={},
    builtins=[],
    context_processors=[],
    string_if_invalid="",
    autoescape=True,
    # Line numbers of parse errors come from Token.lineno, which both lexers set; debug
    # adds the failing node's line to render errors (exception.template_debug). It
    # shows nothing to recipients: render errors become TemplateRejected.
    debug=True,
)


class _VariableCollector:
    """Walks a compiled template: checks every variable's root and collects the data
    paths used, with loop and {% with %} aliases expanded ("payload.items.name")."""

    def __init__(self, local_names: set[str]) -> None:
        self.local_names = local_names  # {% cycle/firstof/now/widthratio ... as name %}
        self.paths: set[str] = set()
        self.problems: list[tuple[int, str]] = []

    def nodes(self, nodelist: Any, scope: dict[str, tuple[str, ...] | None]) -> None:
        for node in nodelist:
            self.node(node, scope)

    def node(self, node: Node, scope: dict[str, tuple[str, ...] | None]) -> None:
        if isinstance(node, TextNode | CommentNode | NowNode | ResetCycleNode):
            return
        if isinstance(node, VariableNode):
            self.expression(node.filter_expression, scope)
        elif isinstance(node, IfNode):
            for condition, nodelist in node.conditions_nodelists:
                if condition is not None:
                    self.condition(condition, scope)
                self.nodes(nodelist, scope)
        elif isinstance(node, ForNode):
            sequence = cast(_CountedSequence, node.sequence).expression
            self.expression(sequence, scope)
            item = self.data_path(sequence, scope)
            self.nodes(node.nodelist_loop, {**scope, "forloop": None, **dict.fromkeys(node.loopvars, item)})
            self.nodes(node.nodelist_empty, scope)
        elif isinstance(node, WithNode):
            for expression in node.extra_context.values():
                self.expression(expression, scope)
            inner = {
                name: self.data_path(expression, scope) for name, expression in node.extra_context.items()
            }
            self.nodes(node.nodelist, {**scope, **inner})
        elif isinstance(node, CycleNode):
            self.expressions(node.cyclevars, scope)
        elif isinstance(node, FirstOfNode):
            self.expressions(node.vars, scope)
        elif isinstance(node, WidthRatioNode):
            self.expressions([node.val_expr, node.max_expr, node.max_width], scope)
        elif isinstance(node, SpacelessNode):
            self.nodes(node.nodelist, scope)
        else:  # only reachable if a tag is added to _TAGS without teaching this walker
            self.problems.append(
                ((node.token and node.token.lineno) or 1, f"unsupported tag {type(node).__name__}")
            )

    def condition(self, condition: Any, scope: dict[str, tuple[str, ...] | None]) -> None:
        if isinstance(condition, TemplateLiteral):
            self.expression(condition.value, scope)
            return
        for operand in (getattr(condition, "first", None), getattr(condition, "second", None)):
            if operand is not None:
                self.condition(operand, scope)

    def expressions(self, expressions: Any, scope: dict[str, tuple[str, ...] | None]) -> None:
        for expression in expressions:
            self.expression(expression, scope)

    def expression(self, expression: Any, scope: dict[str, tuple[str, ...] | None]) -> None:
        for variable in expression.variables():
            path = self.variable_path(variable, expression.lineno, scope)
            if path:
                self.paths.add(".".join(segment for segment in path if not segment.isdigit()))

    def data_path(self, expression: Any, scope: dict[str, tuple[str, ...] | None]) -> tuple[str, ...] | None:
        if not expression.is_var or expression.var.lookups is None:
            return None
        return self.variable_path(expression.var, None, scope)

    def variable_path(
        self, variable: Variable, lineno: int | None, scope: dict[str, tuple[str, ...] | None]
    ) -> tuple[str, ...] | None:
        """The data path a variable reads, None for template-local values; reports
        unknown roots when given a line."""
        if variable.lookups is None:
            return None
        root, *rest = variable.lookups
        if root in scope:
            base = scope[root]
            return (*base, *rest) if base is not None else None
        if root in ALLOWED_ROOTS:
            return tuple(variable.lookups)
        if root in self.local_names or (root in ("True", "False", "None") and not rest):
            return None
        if lineno is not None:
            allowed = ", ".join(ALLOWED_ROOTS)
            self.problems.append((lineno, f"unknown variable '{variable.var}' (templates can use {allowed})"))
        return None


@dataclass(frozen=True)
class _Compiled:
    template: Template
    paths: frozenset[str]


@functools.lru_cache(maxsize=64)  # a broadcast renders one version thousands of times
def _compile(source: str) -> _Compiled:
    if len(source) > MAX_SOURCE_CHARS:
        raise _CompileFailed([(1, f"the template is longer than {MAX_SOURCE_CHARS:,} characters")])
    template = _RestrictedTemplate(source, engine=_ENGINE)
    local_names = {
        name
        for node_type, attribute in (
            (CycleNode, "variable_name"),
            (FirstOfNode, "asvar"),
            (NowNode, "asvar"),
            (WidthRatioNode, "asvar"),
        )
        for node in template.nodelist.get_nodes_by_type(node_type)
        if (name := getattr(node, attribute, None))
    }
    collector = _VariableCollector(local_names)
    collector.nodes(template.nodelist, {})
    if collector.problems:
        raise _CompileFailed(collector.problems)
    return _Compiled(template=template, paths=frozenset(collector.paths))


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


# --- Context ---------------------------------------------------------------------------


def _plain_json(value: Any) -> Any:
    """dict/list/str/int/float/bool/None only: dates become ISO strings (and the date
    filter reads them back), anything else that JSON cannot hold raises TypeError."""
    return json.loads(json.dumps(value, cls=DjangoJSONEncoder))


def _field_path(path: str) -> tuple[str, ...]:
    # "items.*.card" (campaigns.schemas) and "items.0.card" both mean "card of every item".
    return tuple(
        segment for segment in path.split(".") if segment and segment != "*" and not segment.isdigit()
    )


_WITHHELD = object()


def _withhold(
    value: Any, path: tuple[str, ...], sensitive: set[tuple[str, ...]], declared: set[tuple[str, ...]]
) -> Any:
    def starts(longer: tuple[str, ...], prefix: tuple[str, ...]) -> bool:
        return longer[: len(prefix)] == prefix

    if any(starts(path, field) for field in declared):
        return value
    inside_sensitive = any(starts(path, field) for field in sensitive)
    above_sensitive = any(starts(field, path) and field != path for field in sensitive)
    above_declared = any(starts(field, path) and field != path for field in declared)
    if inside_sensitive and not above_declared:
        return _WITHHELD
    if not (inside_sensitive or above_sensitive):
        return value
    if isinstance(value, dict):
        kept = {}
        for key, item in value.items():
            item_path = path if key.isdigit() else (*path, key)
            if (item := _withhold(item, item_path, sensitive, declared)) is not _WITHHELD:
                kept[key] = item
        return kept
    if isinstance(value, list):
        return [
            item
            for item in (_withhold(item, path, sensitive, declared) for item in value)
            if item is not _WITHHELD
        ]
    # A scalar where the schema has an object or list holding sensitive data: it may
    # contain that data in some other shape, so it is withheld too.
    return _WITHHELD


def build_context(
    *,
    contact: dict[str, Any],
    event: dict[str, Any],
    payload: dict[str, Any],
    links: dict[str, Any],
    sensitive_fields: set[str],
    declared_fields: set[str],
) -> dict[str, Any]:
    """The plain-JSON context templates render with. Payload fields in sensitive_fields
    ("card_last4", "address.street", "items.*.card", relative to the payload) are removed
    unless declared_fields (same form) names them or an object around them."""
    sensitive = {path for path in map(_field_path, sensitive_fields) if path}
    declared = {path for path in map(_field_path, declared_fields) if path}
    plain_payload = _withhold(_plain_json(payload), (), sensitive, declared)
    return {
        "contact": _plain_json(contact),
        "event": _plain_json(event),
        "payload": plain_payload if plain_payload is not _WITHHELD else {},
        "links": _plain_json(links),
    }


# --- HTML sanitising -----------------------------------------------------------------

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


def _filter_attribute(tag: str, attribute: str, value: str) -> str | None:
    if attribute == "style" and any(flag in value.lower() for flag in _STYLE_RED_FLAGS):
        return None
    # nh3's url_schemes is one list for every URL attribute: mailto: must not be an image.
    if attribute in _URL_PREFIXES and not value.strip().lower().startswith(_URL_PREFIXES[attribute]):
        return None
    return value


def _sanitize_email_html(html: str) -> str:
    # Argument names and semantics: nh3.clean's docstring (nh3 0.3.8,
    # https://nh3.readthedocs.io/en/latest/#nh3.clean).
    return nh3.clean(
        html,
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


# --- Plain text ------------------------------------------------------------------------

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
        html=render_to_string("email/layout.html", {**layout, "body": mark_safe(body_html)}),  # noqa: S308
        text=_tidy_text(render_to_string("email/layout.txt", {**layout, "body": body_text})) + "\n",
    )
