"""Tests for campaigns.rules: the automation condition language."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from campaigns.rules import (
    MAX_DEPTH,
    MAX_LIST_LENGTH,
    MAX_NODES,
    OPERATORS,
    RuleError,
    describe_rule,
    evaluate,
    rule_fields,
    validate_rule,
)


def cmp(field: str, op: str, *value: Any) -> dict[str, Any]:
    """A comparison node; pass no value for exists / not_exists."""
    node: dict[str, Any] = {"field": field, "op": op}
    if value:
        (node["value"],) = value
    return node


def holds(op: str, actual: Any, *value: Any) -> bool:
    return evaluate(cmp("payload.x", op, *value), {"payload": {"x": actual}, "contact": {}, "event": {}})


# --------------------------------------------------------------------------- always true


@pytest.mark.parametrize("rule", [None, {}])
@pytest.mark.parametrize("data", [{}, {"payload": {"x": 1}}])
def test_null_and_empty_rule_are_always_true(rule: Any, data: dict[str, Any]) -> None:
    assert evaluate(rule, data) is True
    assert rule_fields(rule) == set()
    assert describe_rule(rule) == "always"


# --------------------------------------------------------------------------- operators

DT_ZULU = "2024-06-01T12:00:00Z"


@pytest.mark.parametrize(
    ("op", "actual", "value", "expected"),
    [
        # eq
        ("eq", "pro", "pro", True),
        ("eq", "pro", "free", False),
        ("eq", "pro", "Pro", False),
        ("eq", 3, 3.0, True),
        ("eq", 3, 4, False),
        ("eq", True, True, True),
        ("eq", False, True, False),
        ("eq", True, 1, False),  # bool is not a number
        ("eq", 1, True, False),
        ("eq", 0, False, False),
        ("eq", "3", 3, False),  # string vs number: incompatible, false
        ("eq", 3, "3", False),
        ("eq", ["pro"], "pro", False),
        ("eq", {"a": "pro"}, "pro", False),
        ("eq", DT_ZULU, "2024-06-01T12:00:00+00:00", True),  # same instant
        ("eq", "2024-06-01T14:00:00+02:00", DT_ZULU, True),
        ("eq", DT_ZULU, "2024-06-01T12:00:01Z", False),
        # ne: same type, different value
        ("ne", "pro", "free", True),
        ("ne", "pro", "pro", False),
        ("ne", 2, 3.5, True),
        ("ne", 3, 3.0, False),
        ("ne", "3", 3, False),  # incompatible is false for ne too
        ("ne", True, 1, False),
        ("ne", True, False, True),
        ("ne", ["free"], "pro", False),
        ("ne", DT_ZULU, "2024-06-01T14:00:00+02:00", False),
        # ordering: numbers across int/float
        ("gt", 5, 3, True),
        ("gt", 3, 3, False),
        ("gt", 3.5, 3, True),
        ("gte", 3, 3.0, True),
        ("gte", 2.9, 3, False),
        ("lt", 2.5, 3, True),
        ("lt", 3, 3, False),
        ("lte", 3, 3.0, True),
        ("lte", 4, 3, False),
        # ordering: strings lexicographically
        ("gt", "b", "a", True),
        ("lt", "b", "a", False),
        ("gt", "10", "9", False),  # strings, so "10" < "9"
        # ordering: incompatible types and booleans are false
        ("gt", "10", 9, False),
        ("lt", 9, "10", False),
        ("gt", True, 0, False),
        ("gte", [5], 3, False),
        ("lt", {"a": 1}, 3, False),
        # ordering: ISO datetimes compare as instants, not as strings
        ("lt", "2024-06-01T12:00:00+02:00", "2024-06-01T11:00:00Z", True),
        ("gt", "2024-06-01T12:00:00+02:00", "2024-06-01T11:00:00Z", False),
        ("gte", "2024-06-01T00:00:00Z", "2024-06-01", True),  # naive means UTC
        ("lt", "2024-05-31T23:59:59Z", "2024-06-01", True),
        ("lt", "2024-06-01T23:00:00-05:00", "2024-06-02", False),  # 04:00Z on the 2nd
        # compact forms that only look like dates stay strings
        ("gt", "20240101", "2023", True),
        ("lt", "20240101", "2024-01-02", False),  # as datetimes this would be true
        # in / not_in
        ("in", "US", ["US", "CA"], True),
        ("in", "FR", ["US", "CA"], False),
        ("in", 3, [1, 2, 3.0], True),
        ("in", True, [1], False),
        ("in", 1, [True], False),
        ("in", ["US"], ["US"], False),  # a list is not an element of a list: use contains
        ("in", DT_ZULU, ["2024-06-01T14:00:00+02:00"], True),
        ("not_in", "FR", ["US", "CA"], True),
        ("not_in", "US", ["US", "CA"], False),
        ("not_in", 3, ["a", "b"], False),  # incompatible: false, like ne
        ("not_in", "x", ["a", 1], False),  # not comparable with every item
        ("not_in", True, [False], True),
        ("not_in", ["x"], ["a"], False),
        # contains: substring or list membership
        ("contains", "hello world", "lo w", True),
        ("contains", "hello", "xyz", False),
        ("contains", "hello", "Hello", False),
        ("contains", ["a", "b"], "b", True),
        ("contains", ["a", "b"], "c", False),
        ("contains", [1, 2], 2.0, True),
        ("contains", [True], 1, False),
        ("contains", [1, None, {"a": 1}], 1, True),
        ("contains", "a1", 1, False),
        ("contains", 15, 5, False),
        ("contains", {"b": 1}, "b", False),
        # starts_with / ends_with (case-sensitive)
        ("starts_with", "ada@example.com", "ada", True),
        ("starts_with", "ada", "Ada", False),
        ("starts_with", 55, "5", False),
        ("ends_with", "ada@example.com", "@example.com", True),
        ("ends_with", "ada@example.org", "@example.com", False),
        ("ends_with", ["x.com"], ".com", False),
    ],
)
def test_operator(op: str, actual: Any, value: Any, expected: bool) -> None:
    assert holds(op, actual, value) is expected


@pytest.mark.parametrize("actual", ["x", "", 0, False, [], {}])
def test_exists_is_true_for_any_present_non_null_value(actual: Any) -> None:
    assert holds("exists", actual) is True
    assert holds("not_exists", actual) is False


def test_datetime_objects_in_data_compare_with_iso_strings() -> None:
    occurred = {"event": {"occurred_at": datetime(2024, 6, 1, 12, tzinfo=UTC)}}
    assert evaluate(cmp("event.occurred_at", "gt", "2024-05-31"), occurred) is True
    assert evaluate(cmp("event.occurred_at", "lt", "2024-05-31"), occurred) is False
    assert evaluate(cmp("event.occurred_at", "eq", "2024-06-01T14:00:00+02:00"), occurred) is True
    naive = {"event": {"occurred_at": datetime(2024, 6, 1, 12)}}
    assert evaluate(cmp("event.occurred_at", "eq", DT_ZULU), naive) is True
    assert evaluate(cmp("event.occurred_at", "eq", "pro"), occurred) is False


# --------------------------------------------------------------------------- missing fields

ONE_OF_EACH = [
    ("eq", "pro"),
    ("ne", "pro"),
    ("gt", 1),
    ("gte", 1),
    ("lt", 1),
    ("lte", 1),
    ("in", ["pro"]),
    ("not_in", ["pro"]),
    ("contains", "p"),
    ("starts_with", "p"),
    ("ends_with", "p"),
    ("exists", None),
    ("not_exists", None),
]


def test_one_of_each_covers_every_operator() -> None:
    assert [op for op, _ in ONE_OF_EACH] == list(OPERATORS)


@pytest.mark.parametrize(("op", "value"), ONE_OF_EACH)
@pytest.mark.parametrize(
    ("field", "data"),
    [
        ("payload.plan", {"payload": {}}),
        ("payload.plan", {"payload": {"plan": None}}),  # null is the same as absent
        ("payload.plan", {}),
        ("payload.plan", {"payload": "not an object"}),
        ("payload.address.city", {"payload": {"address": "1 Main St"}}),
        ("payload.items.2.sku", {"payload": {"items": [{"sku": "a"}]}}),
        ("payload.items.-1", {"payload": {"items": ["a"]}}),
        ("payload.items.first", {"payload": {"items": ["a"]}}),
        ("contact.country", {"contact": {"email": "ada@example.com"}}),
    ],
)
def test_missing_field_is_false_except_for_not_exists(
    op: str, value: Any, field: str, data: dict[str, Any]
) -> None:
    rule = cmp(field, op) if value is None else cmp(field, op, value)
    assert evaluate(rule, data) is (op == "not_exists")


def test_not_eq_matches_missing_data_where_ne_does_not() -> None:
    data: dict[str, Any] = {"payload": {}}
    assert evaluate(cmp("payload.plan", "ne", "free"), data) is False
    assert evaluate({"not": cmp("payload.plan", "eq", "free")}, data) is True


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("payload.items.0.sku", "A-1"),
        ("payload.items.1.sku", "B-2"),
        ("payload.items.1.tags.0", "new"),
        ("payload.codes.0", "key-zero"),  # a digit segment on an object is a key
        ("contact.country", "FR"),
        ("event.type", "order.paid"),
    ],
)
def test_field_paths_reach_nested_values(field: str, expected: str) -> None:
    data = {
        "payload": {
            "items": [{"sku": "A-1"}, {"sku": "B-2", "tags": ["new"]}],
            "codes": {"0": "key-zero"},
        },
        "contact": {"country": "FR", "email": "ada@example.com"},
        "event": {"type": "order.paid"},
    }
    assert evaluate(cmp(field, "eq", expected), data) is True
    assert evaluate(cmp(field, "eq", "something else"), data) is False


# --------------------------------------------------------------------------- boolean logic

T = cmp("payload.t", "eq", True)
F = cmp("payload.f", "eq", True)
DATA = {"payload": {"t": True, "f": False}}


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"and": [T]}, True),
        ({"and": [T, T]}, True),
        ({"and": [T, F]}, False),
        ({"and": [F, T]}, False),
        ({"or": [F]}, False),
        ({"or": [F, T]}, True),
        ({"or": [F, F]}, False),
        ({"not": T}, False),
        ({"not": F}, True),
        ({"not": {"not": T}}, True),
        ({"and": [T, {"or": [F, {"not": F}]}]}, True),
        ({"and": [T, {"or": [F, {"not": T}]}]}, False),
        ({"or": [{"and": [T, F]}, {"and": [T, {"not": F}]}]}, True),
        ({"not": {"or": [F, {"and": [T, T]}]}}, False),
    ],
)
def test_boolean_logic(rule: dict[str, Any], expected: bool) -> None:
    assert evaluate(rule, DATA) is expected


# --------------------------------------------------------------------------- validation

OPS_LIST = ", ".join(OPERATORS)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ([], "conditions: a condition must be an object, got list"),
        ("payload.plan = pro", "conditions: a condition must be an object, got string"),
        ({"foo": 1}, "conditions: unexpected keys 'foo'"),
        (
            {"field": "payload.a", "op": "eq", "value": 1, "values": [1], "Op": "x"},
            "conditions: unexpected keys 'Op', 'values'",
        ),
        ({"and": [T], "or": [T]}, "conditions: use one of 'and', 'or', 'not' per object, got 'and', 'or'"),
        ({"and": [T], "field": "payload.a"}, "conditions: unexpected keys 'field' beside 'and'"),
        ({"and": []}, "conditions: 'and' needs a non-empty list of conditions"),
        ({"or": T}, "conditions: 'or' needs a non-empty list of conditions"),
        ({"not": [T]}, "conditions.not: a condition must be an object, got list"),
        ({"not": None}, "conditions.not: a condition must be an object, got null"),
        ({"and": [T, {}]}, "conditions.and[1]: empty condition (only the whole rule may be {} or null)"),
        ({"and": [T, None]}, "conditions.and[1]: a condition must be an object, got null"),
        (
            {"and": [T, cmp("payload.a", "eqq", 1)]},
            f"conditions.and[1]: unknown operator 'eqq' (expected one of: {OPS_LIST})",
        ),
        (
            {"field": "payload.a", "op": 3, "value": 1},
            f"conditions: unknown operator number (expected one of: {OPS_LIST})",
        ),
        (
            {"or": [cmp("plan", "eq", 1)]},
            "conditions.or[0].field: path must start with payload., contact. or event.",
        ),
        (cmp("payload", "exists"), "conditions.field: path must start with payload., contact. or event."),
        (cmp("user.id", "exists"), "conditions.field: path must start with payload., contact. or event."),
        (
            cmp("payload..plan", "exists"),
            "conditions.field: invalid path segment '' in 'payload..plan' (use letters, digits, '_' and '-')",
        ),
        (
            cmp("payload.first name", "exists"),
            "conditions.field: invalid path segment 'first name' in 'payload.first name' "
            "(use letters, digits, '_' and '-')",
        ),
        (cmp("payload." + "a" * 200, "exists"), "conditions.field: path is longer than 200 characters"),
        ({"field": ["payload.a"], "op": "exists"}, "conditions.field: must be a string, got list"),
        ({"op": "eq", "value": 1}, "conditions: missing 'field'"),
        ({"field": "payload.a", "value": 1}, "conditions: missing 'op'"),
        (
            {"and": [T, T, cmp("payload.a", "in", "US")]},
            "conditions.and[2]: 'in' needs a list value, got string",
        ),
        (cmp("payload.a", "not_in", []), "conditions: 'not_in' needs a non-empty list value"),
        (
            cmp("payload.a", "in", ["US", ["CA"]]),
            "conditions.value[1]: list items must be strings, numbers or booleans, got list",
        ),
        (
            cmp("payload.a", "in", [None]),
            "conditions.value[0]: list items must be strings, numbers or booleans, got null",
        ),
        ({"field": "payload.a", "op": "eq"}, "conditions: 'eq' needs a value"),
        ({"field": "payload.a", "op": "exists", "value": True}, "conditions: 'exists' takes no value"),
        (
            {"field": "payload.a", "op": "not_exists", "value": None},
            "conditions: 'not_exists' takes no value",
        ),
        (
            cmp("payload.a", "eq", None),
            "conditions: 'eq' cannot compare with null (use exists / not_exists)",
        ),
        (
            cmp("payload.a", "eq", ["US"]),
            "conditions: 'eq' needs a string, number or boolean value, got list (use 'in' to compare with a list)",
        ),
        (
            cmp("payload.a", "contains", {"a": 1}),
            "conditions: 'contains' needs a string, number or boolean value, got object",
        ),
        (
            cmp("payload.a", "ne", float("nan")),
            "conditions: 'ne' needs a string, number or boolean value, got non-finite number",
        ),
        (cmp("payload.a", "gt", True), "conditions: 'gt' needs a number or string value, got boolean"),
        (cmp("payload.a", "lte", [1]), "conditions: 'lte' needs a number or string value, got list"),
        (cmp("payload.a", "starts_with", 5), "conditions: 'starts_with' needs a string value, got number"),
        (
            cmp("payload.a", "matches", "^a"),
            f"conditions: unknown operator 'matches' (expected one of: {OPS_LIST})",
        ),
        (
            {"not": {"or": [T, {"and": [T, cmp("payload.a", "gt", None)]}]}},
            "conditions.not.or[1].and[1]: 'gt' cannot compare with null (use exists / not_exists)",
        ),
    ],
)
def test_validation_names_location_and_problem(rule: Any, message: str) -> None:
    with pytest.raises(RuleError) as caught:
        validate_rule(rule)
    assert str(caught.value) == message


def test_rule_error_is_a_value_error_with_location_and_problem() -> None:
    with pytest.raises(ValueError) as caught:
        validate_rule({"and": [T, cmp("payload.a", "eqq", 1)]})
    assert isinstance(caught.value, RuleError)
    assert caught.value.location == "conditions.and[1]"
    assert caught.value.problem.startswith("unknown operator 'eqq'")


@pytest.mark.parametrize("op", [op for op in OPERATORS])
def test_every_operator_validates_with_a_suitable_value(op: str) -> None:
    value = dict(ONE_OF_EACH)[op]
    rule = cmp("payload.a", op) if value is None else cmp("payload.a", op, value)
    validate_rule(rule)  # does not raise


def nested_nots(levels: int) -> dict[str, Any]:
    rule: dict[str, Any] = T
    for _ in range(levels):
        rule = {"not": rule}
    return rule


def test_depth_limit() -> None:
    validate_rule(nested_nots(MAX_DEPTH - 1))  # the comparison sits at depth MAX_DEPTH
    with pytest.raises(RuleError) as caught:
        validate_rule(nested_nots(MAX_DEPTH))
    assert str(caught.value) == (
        "conditions" + ".not" * MAX_DEPTH + ": conditions are nested deeper than 16 levels"
    )


def test_node_limit() -> None:
    validate_rule({"and": [T] * (MAX_NODES - 1)})  # the "and" node counts too
    with pytest.raises(RuleError) as caught:
        validate_rule({"and": [T] * MAX_NODES})
    assert str(caught.value) == "conditions: too many conditions (the limit is 200)"


def test_node_limit_stops_early_on_huge_lists() -> None:
    with pytest.raises(RuleError, match="too many conditions"):
        validate_rule({"or": [T] * 1_000_000})


def test_list_value_limit() -> None:
    validate_rule(cmp("payload.a", "in", list(range(MAX_LIST_LENGTH))))
    with pytest.raises(RuleError) as caught:
        validate_rule(cmp("payload.a", "in", list(range(MAX_LIST_LENGTH + 1))))
    assert str(caught.value) == "conditions: 'in' list has 1001 items (the limit is 1000)"


def test_self_referencing_rule_is_an_error_not_a_recursion_error() -> None:
    rule: dict[str, Any] = {}
    rule["not"] = rule
    with pytest.raises(RuleError, match="nested deeper than 16 levels"):
        validate_rule(rule)


# --------------------------------------------------------------------------- evaluate robustness


def test_evaluate_rejects_invalid_rule_even_when_a_branch_would_short_circuit() -> None:
    rule = {"or": [T, cmp("payload.a", "eqq", 1)]}
    with pytest.raises(RuleError, match=r"conditions\.or\[1\]: unknown operator 'eqq'"):
        evaluate(rule, DATA)


@pytest.mark.parametrize(
    "data",
    [
        [],
        "payload",
        {"payload": [1, 2]},
        {"payload": {"x": object()}},
        {"payload": {"x": Decimal("NaN")}},
        {"payload": {"x": float("nan")}},
        {"payload": {"x": {1, 2}}},
    ],
)
@pytest.mark.parametrize(("op", "value"), [pair for pair in ONE_OF_EACH if pair[1] is not None])
def test_evaluate_never_raises_on_odd_data(data: Any, op: str, value: Any) -> None:
    assert evaluate(cmp("payload.x", op, value), data) is False


# --------------------------------------------------------------------------- rule_fields and describe_rule

EXAMPLE = {
    "and": [
        cmp("payload.plan", "eq", "pro"),
        {"not": cmp("contact.country", "in", ["US", "CA"])},
        {"or": [cmp("event.type", "exists"), cmp("payload.items.0.price", "gte", 10.5)]},
        cmp("payload.plan", "ne", "free"),
    ]
}


def test_rule_fields_lists_each_referenced_path_once() -> None:
    assert rule_fields(EXAMPLE) == {"payload.plan", "contact.country", "event.type", "payload.items.0.price"}
    assert rule_fields(cmp("contact.email", "ends_with", "@example.com")) == {"contact.email"}


def test_rule_fields_rejects_invalid_rule() -> None:
    with pytest.raises(RuleError):
        rule_fields({"and": [cmp("plan", "eq", 1)]})


@pytest.mark.parametrize(
    ("rule", "text"),
    [
        (
            {"and": [cmp("payload.plan", "eq", "pro"), {"not": cmp("contact.country", "in", ["US", "CA"])}]},
            'payload.plan = "pro" and not (contact.country in ["US", "CA"])',
        ),
        (
            EXAMPLE,
            'payload.plan = "pro" and not (contact.country in ["US", "CA"]) '
            'and (event.type exists or payload.items.0.price >= 10.5) and payload.plan != "free"',
        ),
        (cmp("payload.a", "not_exists"), "payload.a does not exist"),
        (cmp("payload.a", "not_in", [1, 2]), "payload.a not in [1, 2]"),
        (cmp("payload.vip", "eq", True), "payload.vip = true"),
        (cmp("contact.city", "starts_with", "Zürich"), 'contact.city starts with "Zürich"'),
        (cmp("contact.email", "ends_with", "@x.com"), 'contact.email ends with "@x.com"'),
        (cmp("payload.n", "lt", 3), "payload.n < 3"),
        (cmp("payload.n", "gt", 3), "payload.n > 3"),
        (cmp("payload.n", "lte", 3), "payload.n <= 3"),
        (cmp("payload.tags", "contains", "sale"), 'payload.tags contains "sale"'),
        ({"or": [{"and": [T, F]}, F]}, "(payload.t = true and payload.f = true) or payload.f = true"),
    ],
)
def test_describe_rule(rule: dict[str, Any], text: str) -> None:
    assert describe_rule(rule) == text


def test_describe_rule_rejects_invalid_rule() -> None:
    with pytest.raises(RuleError, match="conditions: unexpected keys 'foo'"):
        describe_rule({"foo": 1})
