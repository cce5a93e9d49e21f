"""The automation condition language: rules are JSON data that marketers edit in the admin.

This module owns the format (validate_rule), its meaning (evaluate), and the two views of a
rule the rest of the system needs (rule_fields, describe_rule). Rules are interpreted here,
never compiled to Python or passed to eval. A broadcast's audience is a rule too, over
contact fields only (audience_validate).

Format, in short (README "The rule language" has the full semantics)::

    null or {}                                        always true (top level only)
    {"and": [rule, ...]}  {"or": [rule, ...]}  {"not": rule}
    {"field": "payload.plan", "op": "eq", "value": "pro"}

There is deliberately no regex operator ("matches"): a marketer-written pattern runs
against attacker-influenced payloads inside the event worker, and Python's backtracking
`re` has no time limit, so one pattern like `(a+)+$` can pin a worker (ReDoS).
contains / starts_with / ends_with cover the cases marketers asked for in linear time.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "MAX_LIST_LENGTH",
    "MAX_NODES",
    "MAX_PATH_LENGTH",
    "OPERATORS",
    "ROOTS",
    "RuleError",
    "describe_rule",
    "evaluate",
    "rule_fields",
    "validate_rule",
]

OPERATORS: tuple[str, ...] = (
    "eq",
    "ne",
    "gt",
    "gte",
    "lt",
    "lte",
    "in",
    "not_in",
    "contains",
    "starts_with",
    "ends_with",
    "exists",
    "not_exists",
)
ROOTS: tuple[str, ...] = ("payload", "contact", "event")

# Bounds keep validation and evaluation cheap and recursion shallow whatever is pasted
# into the admin; evaluation runs once per (event, active automation).
MAX_DEPTH = 16
MAX_NODES = 200
MAX_LIST_LENGTH = 1000
MAX_PATH_LENGTH = 200

ROOT_LOCATION = "conditions"

_BOOLEAN_KEYS = frozenset({"and", "or", "not"})
_COMPARISON_KEYS = frozenset({"field", "op", "value"})
_NO_VALUE_OPS = frozenset({"exists", "not_exists"})
_LIST_OPS = frozenset({"in", "not_in"})
_ORDER_OPS = frozenset({"gt", "gte", "lt", "lte"})
_STRING_OPS = frozenset({"starts_with", "ends_with"})
# Same alphabet as payload schema field names (campaigns.schemas), so every declared
# payload field can be referenced; a digit segment indexes a list ("payload.items.0.sku").
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
# Only strings that start like an ISO 8601 calendar date are tried as datetimes, so that
# ids such as "20240101" or "2024" keep comparing as plain strings.
_ISO_DATE_PREFIX_RE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)

_SYMBOLS = {
    "eq": "=",
    "ne": "!=",
    "gt": ">",
    "gte": ">=",
    "lt": "<",
    "lte": "<=",
    "in": "in",
    "not_in": "not in",
    "contains": "contains",
    "starts_with": "starts with",
    "ends_with": "ends with",
    "exists": "exists",
    "not_exists": "does not exist",
}


class RuleError(ValueError):
    """A rule is not valid. `location` is where ("conditions.and[1]"), `problem` is what."""

    def __init__(self, location: str, problem: str) -> None:
        super().__init__(f"{location}: {problem}")
        self.location = location
        self.problem = problem


# --------------------------------------------------------------------------- validation


def validate_rule(rule: object) -> None:
    """Raise RuleError naming the location and the problem of the first defect found."""
    _validated(rule)


def _validated(rule: object) -> dict[str, Any] | None:
    """The rule's root node once validated, None for an always-true rule."""
    if _is_always_true(rule):
        return None
    _validate_node(rule, ROOT_LOCATION, 1, [0])
    assert isinstance(rule, dict)  # _validate_node raised otherwise
    return rule


def _is_always_true(rule: object) -> bool:
    return rule is None or (isinstance(rule, dict) and not rule)


def _validate_node(node: object, location: str, depth: int, counter: list[int]) -> None:
    if depth > MAX_DEPTH:
        raise RuleError(location, f"conditions are nested deeper than {MAX_DEPTH} levels")
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise RuleError(ROOT_LOCATION, f"too many conditions (the limit is {MAX_NODES})")
    if not isinstance(node, dict):
        raise RuleError(location, f"a condition must be an object, got {_type_name(node)}")
    if not node:
        # {} is "always true" at the top level only; nested, it is almost always an
        # unfinished edit, and "not {}" would silently mean "never".
        raise RuleError(location, "empty condition (only the whole rule may be {} or null)")

    keys = set(node)
    boolean_keys = keys & _BOOLEAN_KEYS
    if boolean_keys:
        if len(boolean_keys) > 1:
            raise RuleError(
                location, f"use one of 'and', 'or', 'not' per object, got {_quoted(boolean_keys)}"
            )
        (kind,) = boolean_keys
        if extra := keys - boolean_keys:
            raise RuleError(location, f"unexpected keys {_quoted(extra)} beside '{kind}'")
        operand = node[kind]
        if kind == "not":
            _validate_node(operand, f"{location}.not", depth + 1, counter)
            return
        if not isinstance(operand, list) or not operand:
            raise RuleError(location, f"'{kind}' needs a non-empty list of conditions")
        for index, child in enumerate(operand):
            _validate_node(child, f"{location}.{kind}[{index}]", depth + 1, counter)
        return

    if extra := keys - _COMPARISON_KEYS:
        raise RuleError(location, f"unexpected keys {_quoted(extra)}")
    _validate_comparison(node, location)


def _validate_comparison(node: dict[str, Any], location: str) -> None:
    if "field" not in node:
        raise RuleError(location, "missing 'field'")
    if "op" not in node:
        raise RuleError(location, "missing 'op'")
    _validate_path(node["field"], f"{location}.field")

    op = node["op"]
    if not isinstance(op, str) or op not in OPERATORS:
        shown = repr(op) if isinstance(op, str) else _type_name(op)
        raise RuleError(location, f"unknown operator {shown} (expected one of: {', '.join(OPERATORS)})")

    if op in _NO_VALUE_OPS:
        if "value" in node:
            raise RuleError(location, f"'{op}' takes no value")
        return
    if "value" not in node:
        raise RuleError(location, f"'{op}' needs a value")
    value = node["value"]

    if op in _LIST_OPS:
        if not isinstance(value, list):
            raise RuleError(location, f"'{op}' needs a list value, got {_type_name(value)}")
        if not value:
            raise RuleError(location, f"'{op}' needs a non-empty list value")
        if len(value) > MAX_LIST_LENGTH:
            raise RuleError(location, f"'{op}' list has {len(value)} items (the limit is {MAX_LIST_LENGTH})")
        for index, item in enumerate(value):
            if not _is_scalar(item):
                raise RuleError(
                    f"{location}.value[{index}]",
                    f"list items must be strings, numbers or booleans, got {_type_name(item)}",
                )
        return

    if value is None:
        # Absent and null are the same thing to the evaluator; say how to test for it.
        raise RuleError(location, f"'{op}' cannot compare with null (use exists / not_exists)")
    if op in _STRING_OPS:
        if not isinstance(value, str):
            raise RuleError(location, f"'{op}' needs a string value, got {_type_name(value)}")
        return
    if op in _ORDER_OPS:
        if isinstance(value, bool) or not _is_scalar(value):
            raise RuleError(location, f"'{op}' needs a number or string value, got {_type_name(value)}")
        return
    # eq, ne, contains
    if not _is_scalar(value):
        hint = " (use 'in' to compare with a list)" if isinstance(value, list) and op != "contains" else ""
        raise RuleError(
            location, f"'{op}' needs a string, number or boolean value, got {_type_name(value)}{hint}"
        )


def _validate_path(path: object, location: str) -> None:
    if not isinstance(path, str):
        raise RuleError(location, f"must be a string, got {_type_name(path)}")
    if len(path) > MAX_PATH_LENGTH:
        raise RuleError(location, f"path is longer than {MAX_PATH_LENGTH} characters")
    root, _, rest = path.partition(".")
    if root not in ROOTS or not rest:
        raise RuleError(location, "path must start with payload., contact. or event.")
    for segment in rest.split("."):
        if not _SEGMENT_RE.fullmatch(segment):
            raise RuleError(
                location,
                f"invalid path segment {segment!r} in {path!r} (use letters, digits, '_' and '-')",
            )


def _is_scalar(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str | int)  # bool is an int subclass: allowed here on purpose


def _type_name(value: object) -> str:
    # JSON vocabulary, because marketers write JSON; "list" rather than "array" to match
    # the operator messages ("'in' needs a list value").
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return "non-finite number"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _quoted(keys: set[str] | frozenset[str]) -> str:
    return ", ".join(f"'{key}'" for key in sorted(map(str, keys)))


# --------------------------------------------------------------------------- evaluation


class _Missing:
    """The value of a field that is absent, null, or unreachable along its path."""


_MISSING = _Missing()


def evaluate(rule: object, data: dict[str, Any]) -> bool:
    """Whether `rule` holds for `data` ({"payload": ..., "contact": ..., "event": ...}).

    The rule is validated first (cheap: at most MAX_NODES nodes), so an invalid rule
    raises RuleError whatever the data, instead of failing only on the events that reach
    the broken branch. Data is never trusted: odd shapes or types make comparisons false.
    """
    root = _validated(rule)
    return True if root is None else _evaluate(root, data)


def _evaluate(node: dict[str, Any], data: object) -> bool:
    if "and" in node:
        return all(_evaluate(child, data) for child in node["and"])
    if "or" in node:
        return any(_evaluate(child, data) for child in node["or"])
    if "not" in node:
        return not _evaluate(node["not"], data)
    return _compare(node["op"], _resolve(data, node["field"]), node.get("value"))


def _resolve(data: object, path: str) -> object:
    current = data
    for segment in path.split("."):
        if isinstance(current, dict):
            if segment not in current:
                return _MISSING
            current = current[segment]
        elif isinstance(current, list) and segment.isdigit():
            index = int(segment)
            if index >= len(current):
                return _MISSING
            current = current[index]
        else:
            return _MISSING
    return _MISSING if current is None else current


def _compare(op: str, actual: object, expected: Any) -> bool:
    if op == "exists":
        return actual is not _MISSING
    if op == "not_exists":
        return actual is _MISSING
    if actual is _MISSING:
        # Every other operator is false on missing data, ne and not_in included: "plan ne
        # free" must not select contacts we know nothing about. not {eq} is the negation.
        return False
    try:
        if op == "eq":
            return _equal(actual, expected) is True
        if op == "ne":
            return _equal(actual, expected) is False
        if op == "in":
            return any(_equal(actual, item) is True for item in expected)
        if op == "not_in":
            return all(_equal(actual, item) is False for item in expected)
        if op in _ORDER_OPS:
            order = _order(actual, expected)
            if order is None:
                return False
            return {"gt": order > 0, "gte": order >= 0, "lt": order < 0, "lte": order <= 0}[op]
        if op == "contains":
            if isinstance(actual, str):
                return isinstance(expected, str) and expected in actual
            if isinstance(actual, list):
                return any(_equal(item, expected) is True for item in actual)
            return False
        if op == "starts_with":
            return isinstance(actual, str) and actual.startswith(expected)
        if op == "ends_with":
            return isinstance(actual, str) and actual.endswith(expected)
    except (TypeError, ValueError, ArithmeticError):
        # Data is not ours to trust (contact attributes, Python objects in event data):
        # anything we cannot compare is "false", never an exception in the event worker.
        return False
    raise RuleError(ROOT_LOCATION, f"unknown operator {op!r}")  # unreachable after validation


def _is_number(value: object) -> bool:
    # NaN (possible in Python-built data, never in validated JSON) is unordered: without
    # this, NaN >= 1 would come out true from the sign arithmetic in _order.
    if isinstance(value, float):
        return not math.isnan(value)
    return isinstance(value, int) and not isinstance(value, bool)


def _equal(actual: object, expected: object) -> bool | None:
    """True/False when the two are comparable, None when their types are incompatible."""
    if _is_number(actual) and _is_number(expected):
        return actual == expected
    if isinstance(actual, bool) and isinstance(expected, bool):
        return actual is expected
    actual_dt, expected_dt = _as_datetime(actual), _as_datetime(expected)
    if actual_dt is not None and expected_dt is not None:
        return actual_dt == expected_dt
    if isinstance(actual, str) and isinstance(expected, str):
        return actual == expected
    return None


def _order(actual: object, expected: object) -> int | None:
    """-1/0/1 comparing actual with expected, None when they cannot be ordered."""
    if _is_number(actual) and _is_number(expected):
        return _sign(actual, expected)
    actual_dt, expected_dt = _as_datetime(actual), _as_datetime(expected)
    if actual_dt is not None and expected_dt is not None:
        return _sign(actual_dt, expected_dt)
    if isinstance(actual, str) and isinstance(expected, str):
        return _sign(actual, expected)
    return None


def _sign(left: Any, right: Any) -> int:
    return (left > right) - (left < right)


def _as_datetime(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        return _parse_datetime(value)
    return None


@lru_cache(maxsize=1024)
def _parse_datetime(value: str) -> datetime | None:
    if len(value) > 64 or not _ISO_DATE_PREFIX_RE.match(value):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    # Naive values are read as UTC: the project runs with TIME_ZONE = "UTC" (a system
    # check enforces it), and a marketer writing "2024-06-01" means the UTC day.
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- views of a rule


def rule_fields(rule: object) -> set[str]:
    """The field paths the rule references, e.g. {"payload.plan", "contact.country"}."""
    root = _validated(rule)
    fields: set[str] = set()
    if root is not None:
        _collect_fields(root, fields)
    return fields


def _collect_fields(node: dict[str, Any], fields: set[str]) -> None:
    if "and" in node or "or" in node:
        for child in node.get("and") or node["or"]:
            _collect_fields(child, fields)
    elif "not" in node:
        _collect_fields(node["not"], fields)
    else:
        fields.add(node["field"])


def describe_rule(rule: object) -> str:
    """A one-line rendering for the admin, e.g. 'payload.plan = "pro" and not (...)'."""
    root = _validated(rule)
    return "always" if root is None else _describe(root)


def _describe(node: dict[str, Any]) -> str:
    for kind in ("and", "or"):
        if kind in node:
            return f" {kind} ".join(_describe_operand(child) for child in node[kind])
    if "not" in node:
        return f"not ({_describe(node['not'])})"
    text = f"{node['field']} {_SYMBOLS[node['op']]}"
    if "value" in node:
        text += " " + json.dumps(node["value"], ensure_ascii=False)
    return text


def _describe_operand(node: dict[str, Any]) -> str:
    # Parenthesise nested and/or so that precedence never has to be remembered.
    text = _describe(node)
    return f"({text})" if ("and" in node or "or" in node) else text


# --------------------------------------------------------------------------- broadcast audiences

AUDIENCE_LOCATION = "audience"


class AudienceError(RuleError):
    """A broadcast's audience rule is not valid; `location` says where ("audience.and[1]")."""


def audience_validate(audience: object) -> None:
    """Raise AudienceError naming the first defect: the rule language's own checks, and
    fields outside `contact.` (a broadcast has no event, so payload./event. fields would
    silently never match)."""
    try:
        validate_rule(audience)
    except RuleError as err:
        raise AudienceError(
            AUDIENCE_LOCATION + err.location.removeprefix(ROOT_LOCATION), err.problem
        ) from err
    for location, path in _fields_with_locations(audience, AUDIENCE_LOCATION):
        if not path.startswith("contact."):
            root = path.partition(".")[0]
            raise AudienceError(
                f"{location}.field",
                f"{path!r}: an audience can only use contact fields (contact.<attribute>, "
                f"contact.email, contact.user_id); a broadcast has no {root}",
            )


def _fields_with_locations(node: object, location: str) -> list[tuple[str, str]]:
    # Only called on a validated rule.
    if not isinstance(node, dict) or not node:
        return []
    for kind in ("and", "or"):
        if kind in node:
            return [
                found
                for index, child in enumerate(node[kind])
                for found in _fields_with_locations(child, f"{location}.{kind}[{index}]")
            ]
    if "not" in node:
        return _fields_with_locations(node["not"], f"{location}.not")
    return [(location, node["field"])]
