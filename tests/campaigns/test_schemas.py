"""Tests for campaigns.schemas: event payload schemas, payload validation and redaction."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from campaigns.schemas import (
    FIELD_TYPES,
    MAX_PAYLOAD_BYTES,
    MAX_PAYLOAD_DEPTH,
    MAX_REPORTED_ERRORS,
    REDACTED,
    PayloadError,
    SchemaError,
    path_is_sensitive,
    redact,
    sensitive_fields,
    validate_payload,
    validate_schema_definition,
)

ORDER_SCHEMA: dict[str, Any] = {
    "fields": {
        "plan": {"type": "string", "required": True, "enum": ["free", "pro"]},
        "amount": {"type": "number"},
        "card_last4": {"type": "string", "sensitive": True, "max_length": 4},
        "address": {"type": "object", "fields": {"city": {"type": "string"}}},
        "items": {
            "type": "array",
            "items": {"type": "object", "fields": {"sku": {"type": "string", "required": True}}},
        },
    },
    "additional_fields": False,
}


def errors_for(schema: dict[str, Any], payload: Any) -> dict[str, str]:
    """The errors validate_payload reports, {} when it accepts the payload."""
    try:
        validate_payload(schema, payload)
    except PayloadError as error:
        return error.errors
    return {}


def one_field(spec: dict[str, Any]) -> dict[str, Any]:
    return {"fields": {"f": spec}}


# --------------------------------------------------------------------------- schema definitions


@pytest.mark.parametrize(
    "schema",
    [
        {},
        {"fields": {}},
        {"additional_fields": True},
        ORDER_SCHEMA,
        {"description": "A paid order.", "fields": {"f": {"type": "any", "description": "anything"}}},
        {"fields": {name: {"type": name} for name in FIELD_TYPES}},
        one_field({"type": "integer", "enum": [1, 2], "min": 0, "max": 2, "nullable": True}),
        one_field({"type": "number", "enum": [1, 2.5], "min": -1.5}),
        one_field({"type": "email", "max_length": 100, "enum": ["ada@example.com"]}),
        one_field({"type": "array", "max_length": 3, "items": {"type": "string", "sensitive": True}}),
        one_field({"type": "object", "additional_fields": True}),
        one_field({"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}),
    ],
)
def test_valid_schema_definitions(schema: dict[str, Any]) -> None:
    validate_schema_definition(schema)  # does not raise


TYPES_LIST = ", ".join(FIELD_TYPES)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ([], "schema: must be an object, got array"),
        (None, "schema: must be an object, got null"),
        (
            {"feilds": {}},
            "schema: unknown keys 'feilds' (expected: 'additional_fields', 'description', 'fields')",
        ),
        ({"fields": []}, "fields: must be an object, got array"),
        ({"additional_fields": "no"}, "additional_fields: must be true or false, got string"),
        ({"description": 3}, "description: must be a string, got integer"),
        (
            one_field({"type": "strng"}),
            f"fields.f.type: unknown type 'strng' (expected one of: {TYPES_LIST})",
        ),
        (
            one_field({"type": ["string"]}),
            f"fields.f.type: unknown type array (expected one of: {TYPES_LIST})",
        ),
        (one_field({"required": True}), f"fields.f.type: missing (expected one of: {TYPES_LIST})"),
        ({"fields": {"f": "string"}}, "fields.f: must be an object, got string"),
        (
            {"fields": {"a.b": {"type": "string"}}},
            "fields.a.b: invalid field name (use 1 to 64 letters, digits, '_' and '-'; no dots)",
        ),
        (
            {"fields": {"first name": {"type": "string"}}},
            "fields.first name: invalid field name (use 1 to 64 letters, digits, '_' and '-'; no dots)",
        ),
        (
            one_field({"type": "string", "requird": True}),
            "fields.f: unknown keys 'requird' for type 'string'",
        ),
        (
            one_field({"type": "integer", "max_length": 3}),
            "fields.f: unknown keys 'max_length' for type 'integer'",
        ),
        (one_field({"type": "string", "min": 3}), "fields.f: unknown keys 'min' for type 'string'"),
        (one_field({"type": "boolean", "enum": [True]}), "fields.f: unknown keys 'enum' for type 'boolean'"),
        (one_field({"type": "string", "fields": {}}), "fields.f: unknown keys 'fields' for type 'string'"),
        (
            one_field({"type": "string", "required": "yes"}),
            "fields.f.required: must be true or false, got string",
        ),
        (
            one_field({"type": "string", "sensitive": 1}),
            "fields.f.sensitive: must be true or false, got integer",
        ),
        (
            one_field({"type": "string", "nullable": None}),
            "fields.f.nullable: must be true or false, got null",
        ),
        (
            one_field({"type": "string", "max_length": -1}),
            "fields.f.max_length: must be a whole number, 0 or more",
        ),
        (
            one_field({"type": "string", "max_length": 2.5}),
            "fields.f.max_length: must be a whole number, 0 or more",
        ),
        (
            one_field({"type": "string", "max_length": True}),
            "fields.f.max_length: must be a whole number, 0 or more",
        ),
        (one_field({"type": "number", "min": "0"}), "fields.f.min: must be a number, got string"),
        (one_field({"type": "number", "max": float("inf")}), "fields.f.max: must be a number, got number"),
        (one_field({"type": "integer", "min": 5, "max": 1}), "fields.f: min (5) is greater than max (1)"),
        (one_field({"type": "string", "enum": []}), "fields.f.enum: must be a non-empty list"),
        (one_field({"type": "string", "enum": "pro"}), "fields.f.enum: must be a non-empty list"),
        (one_field({"type": "string", "enum": ["a", 1]}), "fields.f.enum[1]: expected string, got integer"),
        (
            one_field({"type": "integer", "enum": [1, True]}),
            "fields.f.enum[1]: expected integer, got boolean",
        ),
        (one_field({"type": "string", "enum": [None]}), "fields.f.enum[0]: expected string, got null"),
        (
            one_field({"type": "string", "max_length": 2, "enum": ["ok", "long"]}),
            "fields.f.enum[1]: is 4 characters long (max_length 2)",
        ),
        (
            one_field({"type": "integer", "max": 10, "enum": [11]}),
            "fields.f.enum[0]: is greater than the maximum 10",
        ),
        (
            one_field({"type": "email", "enum": ["not-an-address"]}),
            "fields.f.enum[0]: not a valid email address",
        ),
        (
            {"fields": {"address": {"type": "object", "fields": {"city": {"type": "strng"}}}}},
            f"fields.address.fields.city.type: unknown type 'strng' (expected one of: {TYPES_LIST})",
        ),
        (
            {"fields": {"address": {"type": "object", "additional_fields": "yes"}}},
            "fields.address.additional_fields: must be true or false, got string",
        ),
        (
            {
                "fields": {
                    "items": {
                        "type": "array",
                        "items": {"type": "object", "fields": {"sku": {"type": "string", "required": 1}}},
                    }
                }
            },
            "fields.items.items.fields.sku.required: must be true or false, got integer",
        ),
        (
            one_field({"type": "array", "items": {"type": "string", "required": True}}),
            "fields.f.items.required: has no meaning for array items",
        ),
        (one_field({"type": "array", "items": "string"}), "fields.f.items: must be an object, got string"),
    ],
)
def test_invalid_schema_definition_names_the_path(schema: Any, message: str) -> None:
    with pytest.raises(SchemaError) as caught:
        validate_schema_definition(schema)
    assert str(caught.value) == message


def test_schema_error_is_a_value_error_with_path() -> None:
    with pytest.raises(ValueError) as caught:
        validate_schema_definition(one_field({"type": "strng"}))
    assert isinstance(caught.value, SchemaError)
    assert caught.value.path == "fields.f.type"


def nested_objects(levels: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        spec = {"type": "object", "fields": {"n": spec}}
    return {"fields": {"n": spec}}


def test_schema_depth_limit() -> None:
    validate_schema_definition(nested_objects(15))  # 16 levels of fields
    with pytest.raises(SchemaError) as caught:
        validate_schema_definition(nested_objects(16))
    assert str(caught.value) == "fields" + ".n.fields" * 16 + ".n: nested deeper than 16 levels"


def test_schema_field_count_limit() -> None:
    validate_schema_definition({"fields": {f"f{i}": {"type": "string"} for i in range(500)}})
    with pytest.raises(SchemaError) as caught:
        validate_schema_definition({"fields": {f"f{i}": {"type": "string"} for i in range(501)}})
    assert str(caught.value) == "schema: too many fields (the limit is 500)"


# --------------------------------------------------------------------------- types


TYPE_CASES: list[tuple[dict[str, Any], Any, str | None]] = [
    ({"type": "string"}, "x", None),
    ({"type": "string"}, "", None),
    ({"type": "string"}, 3, "expected string, got integer"),
    ({"type": "string"}, ["x"], "expected string, got array"),
    ({"type": "integer"}, 3, None),
    ({"type": "integer"}, -3, None),
    ({"type": "integer"}, 3.0, None),  # JSON Schema: a whole float is an integer
    ({"type": "integer"}, 3.5, "expected integer, got number"),
    ({"type": "integer"}, True, "expected integer, got boolean"),
    ({"type": "integer"}, "3", "expected integer, got string"),
    ({"type": "number"}, 3, None),
    ({"type": "number"}, 3.5, None),
    ({"type": "number"}, False, "expected number, got boolean"),
    ({"type": "number"}, "3.5", "expected number, got string"),
    ({"type": "boolean"}, True, None),
    ({"type": "boolean"}, False, None),
    ({"type": "boolean"}, 1, "expected boolean, got integer"),
    ({"type": "boolean"}, "true", "expected boolean, got string"),
    ({"type": "object"}, {"anything": [1]}, None),
    ({"type": "object"}, [], "expected object, got array"),
    ({"type": "array"}, [1, "a", None], None),
    ({"type": "array"}, {}, "expected array, got object"),
    ({"type": "array"}, "abc", "expected array, got string"),
    ({"type": "datetime"}, "2024-06-01T12:00:00Z", None),
    ({"type": "datetime"}, "2024-06-01T12:00:00.123456+02:00", None),
    ({"type": "datetime"}, "2024-06-01T12:00:00", "datetime needs a timezone offset (e.g. Z or +00:00)"),
    (
        {"type": "datetime"},
        "2024-06-01",
        "not an ISO 8601 datetime (expected e.g. 2024-06-01T12:00:00Z)",
    ),
    (
        {"type": "datetime"},
        "2024-13-01T00:00:00Z",
        "not an ISO 8601 datetime (expected e.g. 2024-06-01T12:00:00Z)",
    ),
    ({"type": "datetime"}, "yesterday", "not an ISO 8601 datetime (expected e.g. 2024-06-01T12:00:00Z)"),
    ({"type": "datetime"}, 1717243200, "expected datetime, got integer"),
    ({"type": "email"}, "ada@example.com", None),
    ({"type": "email"}, "ada.lovelace+news@mail.example.co.uk", None),
    ({"type": "email"}, "ada", "not a valid email address"),
    ({"type": "email"}, "ada@localhost", "not a valid email address"),
    ({"type": "email"}, "@example.com", "not a valid email address"),
    ({"type": "email"}, "ada@example..com", "not a valid email address"),
    ({"type": "email"}, "ada@@example.com", "not a valid email address"),
    ({"type": "email"}, "a da@example.com", "not a valid email address"),
    ({"type": "email"}, "a" * 250 + "@x.com", "not a valid email address"),
    ({"type": "email"}, 42, "expected email, got integer"),
    ({"type": "any"}, 1, None),
    ({"type": "any"}, "x", None),
    ({"type": "any"}, [1, {"a": None}], None),
    ({"type": "any"}, {"a": 1}, None),
    # null is accepted only when nullable, whatever the type
    ({"type": "any"}, None, "expected any, got null"),
    ({"type": "string"}, None, "expected string, got null"),
    ({"type": "object"}, None, "expected object, got null"),
    ({"type": "string", "nullable": True}, None, None),
    ({"type": "object", "nullable": True, "fields": {"a": {"type": "string", "required": True}}}, None, None),
    # enum
    ({"type": "string", "enum": ["free", "pro"]}, "pro", None),
    ({"type": "string", "enum": ["free", "pro"]}, "team", 'must be one of "free", "pro"'),
    ({"type": "string", "enum": ["free", "pro"]}, "Pro", 'must be one of "free", "pro"'),
    ({"type": "integer", "enum": [1, 2]}, 2, None),
    ({"type": "integer", "enum": [1, 2]}, 3, "must be one of 1, 2"),
    ({"type": "integer", "enum": [1, 2]}, True, "expected integer, got boolean"),
    ({"type": "number", "enum": [1, 2.5]}, 1.0, None),
    (
        {"type": "string", "enum": [f"v{i}" for i in range(25)]},
        "x",
        "must be one of " + ", ".join(f'"v{i}"' for i in range(20)) + ", ...",
    ),
    # max_length, min, max
    ({"type": "string", "max_length": 4}, "1234", None),
    ({"type": "string", "max_length": 4}, "12345", "is 5 characters long (max_length 4)"),
    ({"type": "string", "max_length": 4}, "éèêë", None),  # characters, not bytes
    ({"type": "array", "max_length": 2}, [1, 2], None),
    ({"type": "array", "max_length": 2}, [1, 2, 3], "has 3 items (max_length 2)"),
    ({"type": "integer", "min": 0, "max": 10}, 0, None),
    ({"type": "integer", "min": 0, "max": 10}, 10, None),
    ({"type": "integer", "min": 0, "max": 10}, -1, "is less than the minimum 0"),
    ({"type": "number", "min": 0, "max": 10}, 10.01, "is greater than the maximum 10"),
]


@pytest.mark.parametrize(("spec", "value", "error"), TYPE_CASES)
def test_field_types_and_options(spec: dict[str, Any], value: Any, error: str | None) -> None:
    expected = {} if error is None else {"f": error}
    assert errors_for(one_field(spec), {"f": value}) == expected


def test_every_type_is_covered_by_the_type_table() -> None:
    # Guards TYPE_CASES: a new type must come with its own accepted and rejected cases.
    accepted = {spec["type"] for spec, _, error in TYPE_CASES if error is None}
    rejected = {spec["type"] for spec, _, error in TYPE_CASES if error is not None}
    assert accepted == rejected == set(FIELD_TYPES)


# --------------------------------------------------------------------------- required and paths


def test_required_field_missing_and_optional_field_absent() -> None:
    schema = {"fields": {"plan": {"type": "string", "required": True}, "note": {"type": "string"}}}
    assert errors_for(schema, {"plan": "pro"}) == {}
    assert errors_for(schema, {"note": "hi"}) == {"plan": "required field is missing"}


def test_required_and_nullable_means_present_but_may_be_null() -> None:
    schema = {"fields": {"coupon": {"type": "string", "required": True, "nullable": True}}}
    assert errors_for(schema, {"coupon": None}) == {}
    assert errors_for(schema, {}) == {"coupon": "required field is missing"}


def test_errors_are_reported_together_with_nested_paths() -> None:
    payload = {
        "amount": "12",
        "address": {"city": 7, "zip": "75001"},
        "items": [{"sku": "A"}, {}, {"sku": 3}],
        "colour": "red",
    }
    assert errors_for(ORDER_SCHEMA, payload) == {
        "plan": "required field is missing",
        "amount": "expected number, got string",
        "address.city": "expected string, got integer",
        "address.zip": "unknown field (not in the schema)",
        "items.1.sku": "required field is missing",
        "items.2.sku": "expected string, got integer",
        "colour": "unknown field (not in the schema)",
    }


def test_array_of_scalars_reports_element_index() -> None:
    schema = one_field({"type": "array", "items": {"type": "integer", "min": 0}})
    assert errors_for(schema, {"f": [1, -1, "2", 3]}) == {
        "f.1": "is less than the minimum 0",
        "f.2": "expected integer, got string",
    }


def test_nested_arrays_report_both_indexes() -> None:
    schema = one_field({"type": "array", "items": {"type": "array", "items": {"type": "boolean"}}})
    assert errors_for(schema, {"f": [[True], [False, "no"]]}) == {"f.1.1": "expected boolean, got string"}


def test_payload_error_message_summarises_every_field() -> None:
    with pytest.raises(PayloadError) as caught:
        validate_payload(ORDER_SCHEMA, {"amount": "12", "colour": "red"})
    assert isinstance(caught.value, ValueError)
    assert str(caught.value) == (
        "invalid payload: plan: required field is missing; amount: expected number, got string; "
        "colour: unknown field (not in the schema)"
    )


def test_the_brief_example_payload_is_accepted() -> None:
    payload = {
        "plan": "pro",
        "amount": 49.5,
        "card_last4": "4242",
        "address": {"city": "Paris"},
        "items": [{"sku": "A-1"}, {"sku": "B-2"}],
    }
    validate_payload(ORDER_SCHEMA, payload)  # does not raise


def test_reported_errors_are_capped() -> None:
    payload = {f"unknown{i}": i for i in range(MAX_REPORTED_ERRORS + 50)}
    errors = errors_for({"fields": {"a": {"type": "string"}}}, payload)
    assert len(errors) == MAX_REPORTED_ERRORS
    assert errors["unknown0"] == "unknown field (not in the schema)"


# --------------------------------------------------------------------------- additional fields


@pytest.mark.parametrize(
    ("schema", "payload", "expected"),
    [
        # declared fields: closed by default
        (
            {"fields": {"a": {"type": "string"}}},
            {"a": "x", "b": 1},
            {"b": "unknown field (not in the schema)"},
        ),
        ({"fields": {"a": {"type": "string"}}, "additional_fields": True}, {"a": "x", "b": 1}, {}),
        # no declared fields: open by default
        ({}, {"anything": {"goes": [1, 2]}}, {}),
        ({"fields": {}}, {"anything": 1}, {}),
        (
            {"fields": {}, "additional_fields": False},
            {"anything": 1},
            {"anything": "unknown field (not in the schema)"},
        ),
        ({"fields": {}, "additional_fields": False}, {}, {}),
        # nested objects follow the same rule
        (one_field({"type": "object"}), {"f": {"x": 1}}, {}),
        (
            one_field({"type": "object", "fields": {"a": {"type": "integer"}}}),
            {"f": {"a": 1, "b": 2}},
            {"f.b": "unknown field (not in the schema)"},
        ),
        (
            one_field({"type": "object", "fields": {"a": {"type": "integer"}}, "additional_fields": True}),
            {"f": {"a": 1, "b": 2}},
            {},
        ),
        (
            one_field({"type": "object", "additional_fields": False}),
            {"f": {"x": 1}},
            {"f.x": "unknown field (not in the schema)"},
        ),
    ],
)
def test_additional_fields(schema: dict[str, Any], payload: dict[str, Any], expected: dict[str, str]) -> None:
    assert errors_for(schema, payload) == expected


# --------------------------------------------------------------------------- non-JSON payloads


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "must be a JSON object, got array"),
        ("{}", "must be a JSON object, got string"),
        (None, "must be a JSON object, got null"),
        (42, "must be a JSON object, got integer"),
        ((("a", 1),), "must be a JSON object, got tuple"),
    ],
)
def test_payload_must_be_an_object(payload: Any, message: str) -> None:
    assert errors_for({}, payload) == {"": message}


def test_root_error_is_named_in_the_summary() -> None:
    with pytest.raises(
        PayloadError, match=r"^invalid payload: \(payload\): must be a JSON object, got array$"
    ):
        validate_payload({}, [])


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"a": float("nan")}, {"a": "NaN and Infinity are not JSON"}),
        ({"a": [1, float("-inf")]}, {"a.1": "NaN and Infinity are not JSON"}),
        ({1: "x"}, {"": "object keys must be strings, got integer key 1"}),
        ({"a": {None: 1, True: 2}}, {"a": "object keys must be strings, got null key None"}),
        (
            {"when": datetime(2024, 6, 1, tzinfo=UTC)},
            {"when": "not a JSON value (datetime; send an ISO 8601 string)"},
        ),
        ({"price": Decimal("9.99")}, {"price": "not a JSON value (Decimal)"}),
        ({"tags": {"a", "b"}}, {"tags": "not a JSON value (set)"}),
        ({"pair": (1, 2)}, {"pair": "not a JSON value (tuple)"}),
        ({"obj": object()}, {"obj": "not a JSON value (object)"}),
        (
            {"a": b"bytes", "b": {"c": 1j}},
            {"a": "not a JSON value (bytes)", "b.c": "not a JSON value (complex)"},
        ),
    ],
)
def test_non_json_values_are_rejected_with_their_path(
    payload: dict[Any, Any], expected: dict[str, str]
) -> None:
    # With an open schema, so that only JSON-ness is being tested.
    assert errors_for({}, payload) == expected


def test_non_json_values_are_rejected_even_where_the_schema_says_any() -> None:
    schema = one_field({"type": "any"})
    assert errors_for(schema, {"f": float("nan")}) == {"f": "NaN and Infinity are not JSON"}


def nested_payload(levels: int) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    for _ in range(levels - 1):
        payload = {"n": payload}
    return payload


def test_payload_depth_limit() -> None:
    assert errors_for({}, nested_payload(MAX_PAYLOAD_DEPTH)) == {}
    path = ".".join(["n"] * MAX_PAYLOAD_DEPTH)
    assert errors_for({}, nested_payload(MAX_PAYLOAD_DEPTH + 1)) == {path: "nested deeper than 20 levels"}


def test_self_referencing_payload_is_an_error_not_a_recursion_error() -> None:
    payload: dict[str, Any] = {}
    payload["self"] = payload
    errors = errors_for({}, payload)
    assert list(errors.values()) == ["nested deeper than 20 levels"]


def test_payload_size_limit() -> None:
    # {"s":"..."} is 8 bytes of JSON around the string
    assert errors_for({}, {"s": "x" * (MAX_PAYLOAD_BYTES - 8)}) == {}
    assert errors_for({}, {"s": "x" * (MAX_PAYLOAD_BYTES - 7)}) == {
        "": "is 65537 bytes serialised (the limit is 65536)"
    }


def test_payload_size_counts_utf8_bytes() -> None:
    assert errors_for({}, {"s": "é" * (MAX_PAYLOAD_BYTES // 2)}) == {
        "": "is 65544 bytes serialised (the limit is 65536)"
    }


def test_validate_payload_rejects_an_invalid_schema() -> None:
    with pytest.raises(SchemaError, match=r"fields\.plan\.type: unknown type 'strng'"):
        validate_payload({"fields": {"plan": {"type": "strng"}}}, {"plan": "pro"})


# --------------------------------------------------------------------------- sensitivity

SENSITIVE_SCHEMA: dict[str, Any] = {
    "fields": {
        "plan": {"type": "string"},
        "card_last4": {"type": "string", "sensitive": True},
        "address": {
            "type": "object",
            "fields": {"city": {"type": "string"}, "street": {"type": "string", "sensitive": True}},
        },
        "billing": {
            "type": "object",
            "sensitive": True,
            "fields": {"iban": {"type": "string", "sensitive": True}, "name": {"type": "string"}},
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "fields": {"sku": {"type": "string"}, "serial": {"type": "string", "sensitive": True}},
            },
        },
        "tags": {"type": "array", "items": {"type": "string", "sensitive": True}},
        "scores": {"type": "array", "items": {"type": "integer"}},
    },
    "additional_fields": True,
}


def test_sensitive_fields() -> None:
    assert sensitive_fields(SENSITIVE_SCHEMA) == {
        "card_last4",
        "address.street",
        "billing",  # its children are covered by it, not listed
        "items.*.serial",
        "tags.*",
    }


@pytest.mark.parametrize("schema", [{}, ORDER_SCHEMA | {"fields": {"plan": {"type": "string"}}}])
def test_sensitive_fields_empty(schema: dict[str, Any]) -> None:
    assert sensitive_fields(schema) == set()


def test_sensitive_fields_of_the_order_schema() -> None:
    assert sensitive_fields(ORDER_SCHEMA) == {"card_last4"}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("plan", False),
        ("card_last4", True),
        ("address", True),  # holds a sensitive field
        ("address.city", False),
        ("address.street", True),
        ("billing", True),
        ("billing.name", True),  # inside a sensitive object
        ("items", True),
        ("items.0", True),
        ("items.3.sku", False),
        ("items.3.serial", True),
        ("items.sku", False),  # not an element path: resolves to nothing
        ("tags", True),
        ("tags.0", True),
        ("scores.0", False),
        ("undeclared", False),
        ("undeclared.card_last4", False),
        ("plan.more", False),
        ("", True),  # the payload as a whole holds sensitive fields
    ],
)
def test_path_is_sensitive(path: str, expected: bool) -> None:
    assert path_is_sensitive(SENSITIVE_SCHEMA, path) is expected


def test_redact_replaces_every_sensitive_value() -> None:
    payload = {
        "plan": "pro",
        "card_last4": "4242",
        "address": {"city": "Paris", "street": "1 rue de Rivoli"},
        "billing": {"iban": "FR76...", "name": "Ada"},
        "items": [{"sku": "A", "serial": "S-1"}, {"sku": "B"}],
        "tags": ["vip", "debtor"],
        "scores": [1, 2],
        "extra": {"note": "kept"},
    }
    original = copy.deepcopy(payload)
    assert redact(SENSITIVE_SCHEMA, payload) == {
        "plan": "pro",
        "card_last4": REDACTED,
        "address": {"city": "Paris", "street": REDACTED},
        "billing": REDACTED,
        "items": [{"sku": "A", "serial": REDACTED}, {"sku": "B"}],
        "tags": [REDACTED, REDACTED],
        "scores": [1, 2],
        "extra": {"note": "kept"},
    }
    assert payload == original  # the input is not modified


def test_redact_returns_an_independent_copy() -> None:
    payload = {"extra": {"note": "kept"}, "scores": [1]}
    result = redact(SENSITIVE_SCHEMA, payload)
    result["extra"]["note"] = "changed"
    result["scores"].append(2)
    assert payload == {"extra": {"note": "kept"}, "scores": [1]}


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        # wrong shapes where sensitive data could hide: the whole value goes
        ({"address": "1 rue de Rivoli, Paris"}, {"address": REDACTED}),
        ({"items": {"serial": "S-1"}}, {"items": REDACTED}),
        ({"items": ["S-1"]}, {"items": [REDACTED]}),
        ({"tags": "vip"}, {"tags": REDACTED}),
        # null reveals nothing, except where the field itself is sensitive
        ({"address": None}, {"address": None}),
        ({"card_last4": None}, {"card_last4": REDACTED}),
        # wrong shapes with nothing sensitive inside are kept for debugging
        ({"plan": {"odd": 1}}, {"plan": {"odd": 1}}),
        ({"scores": "1,2"}, {"scores": "1,2"}),
    ],
)
def test_redact_invalid_payloads_fails_closed(payload: dict[str, Any], expected: dict[str, Any]) -> None:
    assert redact(SENSITIVE_SCHEMA, payload) == expected


def test_redact_self_referencing_payload_terminates() -> None:
    payload: dict[str, Any] = {"card_last4": "4242"}
    payload["loop"] = payload
    result = redact(SENSITIVE_SCHEMA, payload)
    assert result["card_last4"] == REDACTED
    depth = 0
    node: Any = result
    while isinstance(node, dict):
        node = node["loop"]
        depth += 1
    assert node == "[too deep]"
    assert depth == MAX_PAYLOAD_DEPTH


def test_redact_with_empty_schema_copies_everything() -> None:
    assert redact({}, {"a": 1, "b": [{"c": 2}]}) == {"a": 1, "b": [{"c": 2}]}


def test_sensitivity_functions_reject_an_invalid_schema() -> None:
    bad = {"fields": {"x": {"type": "strng"}}}
    for call in (lambda: sensitive_fields(bad), lambda: path_is_sensitive(bad, "x"), lambda: redact(bad, {})):
        with pytest.raises(SchemaError):
            call()
