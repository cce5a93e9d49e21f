"""The restricted template engine: a parser that rejects what the allowlist does not
name and makes every node charge the render budget, and the compile step that checks a
template's variables and collects the data paths it uses."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from django.template import Context, Engine, Library
from django.template.base import (
    DebugLexer,
    Node,
    Parser,
    Template,
    TextNode,
    Token,
    TokenType,
    Variable,
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

from campaigns.rendering.allowlist import (
    _BLOCK_TAGS,
    _TAG_WORDS,
    _CheckedFilterExpression,
    _CountedSequence,
    _library,
)
from campaigns.rendering.context import ALLOWED_ROOTS
from campaigns.rendering.limits import _BUDGET, MAX_NESTING, MAX_SOURCE_CHARS

# --- Nodes: every node render is charged ----------------------------------------------

_OUTPUT_NODES = (TextNode, VariableNode, CycleNode, FirstOfNode, NowNode, WidthRatioNode)


class _BudgetedNode(Node):
    # Set per budgeted class: containers' output is their children's, already charged.
    _charges_output: ClassVar[bool] = False

    def render_annotated(self, context: Context) -> str:
        # The hottest method of a render (every node of every email): one lookup of
        # the budget, and the two charges that _charge(work=1) / _charge(output=...)
        # would make.
        budget = _BUDGET.get()
        if budget is None:
            return cast(str, super().render_annotated(context))
        lineno = self.token.lineno if self.token is not None else None
        budget.charge_work(lineno)
        output = cast(str, super().render_annotated(context))
        if self._charges_output:
            budget.charge_output(len(output), lineno)
        return output


class _BudgetedTextNode(TextNode):
    # The same charges as _BudgetedNode, for the commonest node: its output is known.
    def render_annotated(self, context: Context) -> str:
        budget = _BUDGET.get()
        if budget is not None:
            lineno = self.token.lineno if self.token is not None else None
            budget.charge_work(lineno)
            budget.charge_output(len(self.s), lineno)
        return self.s


_BUDGETED_CLASSES: dict[type[Node], type[Node]] = {TextNode: _BudgetedTextNode}


def _budgeted_class(cls: type[Node]) -> type[Node]:
    if cls not in _BUDGETED_CLASSES:
        _BUDGETED_CLASSES[cls] = type(
            f"Budgeted{cls.__name__}",
            (_BudgetedNode, cls),
            {"__module__": __name__, "_charges_output": issubclass(cls, _OUTPUT_NODES)},
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
