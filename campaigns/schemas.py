"""Event payload schemas: their JSON format, payload validation at emit time, and redaction.

An event type carries a schema that marketers edit in the admin; emit() validates every
payload against it so that a typo or a wrong type surfaces in the caller's code, not as a
silently unmatched automation. Fields marked sensitive are redacted from logs and admin
lists. README "Event types and payload schemas" documents the format.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from datetime import date, datetime
from typing import Any

__all__ = [
    "FIELD_TYPES",
    "MAX_PAYLOAD_BYTES",
    "MAX_PAYLOAD_DEPTH",
    "MAX_REPORTED_ERRORS",
    "MAX_SCHEMA_DEPTH",
    "MAX_SCHEMA_FIELDS",
    "REDACTED",
    "PayloadError",
    "SchemaError",
    "check_payload",
    "path_is_sensitive",
    "redact",
    "sensitive_fields",
    "validate_payload",
    "validate_schema_definition",
]

FIELD_TYPES: tuple[str, ...] = (
    "string",
    "integer",
    "number",
    "boolean",
    "object",
    "array",
    "datetime",
    "email",
    "any",
)
REDACTED = "[redacted]"

# Payload bounds: events are stored in the outbox row and fanned out to every matching
# automation, so a runaway payload costs storage and worker time many times over.
MAX_PAYLOAD_BYTES = 64 * 1024  # compact UTF-8 JSON
MAX_PAYLOAD_DEPTH = 20  # nested objects/arrays, the payload itself being level 1
# A payload of thousands of bad items would otherwise produce an error body as large as it.
MAX_REPORTED_ERRORS = 100
# Schema bounds: a schema is configuration, these only stop accidents (and deep recursion).
MAX_SCHEMA_DEPTH = 16
MAX_SCHEMA_FIELDS = 500
MAX_ENUM_LENGTH = 1000
MAX_EMAIL_LENGTH = 254  # RFC 5321 path limit

# Field names are the segments of rule paths (campaigns.rules uses the same alphabet), so
# no dots, and "*" stays free to mean "any array element" in sensitive_fields().
_FIELD_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
_ISO_DATETIME_PREFIX_RE = re.compile(r"\d{4}-\d{2}-\d{2}T", re.ASCII)

_COMMON_OPTIONS = frozenset({"type", "required", "sensitive", "nullable", "description"})
_TYPE_OPTIONS: dict[str, frozenset[str]] = {
    "string": frozenset({"enum", "max_length"}),
    "email": frozenset({"enum", "max_length"}),
    "integer": frozenset({"enum", "min", "max"}),
    "number": frozenset({"enum", "min", "max"}),
    "boolean": frozenset(),
    "datetime": frozenset(),
    "any": frozenset(),
    "object": frozenset({"fields", "additional_fields"}),
    "array": frozenset({"items", "max_length"}),
}
_SCHEMA_KEYS = frozenset({"fields", "additional_fields", "description"})
_BOOLEAN_OPTIONS = ("required", "sensitive", "nullable")


class SchemaError(ValueError):
    """A schema definition is not valid. `path` is where ("fields.plan.type")."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class PayloadError(ValueError):
    """A payload does not match its schema.

    `errors` maps a dotted path relative to the payload ("plan", "items.0.sku") to what is
    wrong there; the empty path "" means the payload as a whole.
    """

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = errors
        shown = "; ".join(f"{path or '(payload)'}: {message}" for path, message in errors.items())
        super().__init__(f"invalid payload: {shown}")


# --------------------------------------------------------------------------- schema definitions


def validate_schema_definition(schema: object) -> None:
    """Raise SchemaError naming the path of the first defect in a schema definition."""
    if not isinstance(schema, dict):
        raise SchemaError("schema", f"must be an object, got {_json_type(schema)}")
    if extra := set(schema) - _SCHEMA_KEYS:
        raise SchemaError("schema", f"unknown keys {_quoted(extra)} (expected: {_quoted(_SCHEMA_KEYS)})")
    _validate_description(schema, "description")
    counter = [0]
    _validate_object_spec(schema, "", depth=1, counter=counter)


def _validate_object_spec(spec: Mapping[str, Any], prefix: str, *, depth: int, counter: list[int]) -> None:
    """Validate the "fields" and "additional_fields" of the schema root or an object field."""
    if "additional_fields" in spec and not isinstance(spec["additional_fields"], bool):
        raise SchemaError(
            f"{prefix}additional_fields",
            f"must be true or false, got {_json_type(spec['additional_fields'])}",
        )
    if "fields" not in spec:
        return
    fields = spec["fields"]
    if not isinstance(fields, dict):
        raise SchemaError(f"{prefix}fields", f"must be an object, got {_json_type(fields)}")
    for name, field_spec in fields.items():
        path = f"{prefix}fields.{name}"
        if not isinstance(name, str) or not _FIELD_NAME_RE.fullmatch(name):
            raise SchemaError(path, "invalid field name (use 1 to 64 letters, digits, '_' and '-'; no dots)")
        _validate_field_spec(field_spec, path, depth=depth, counter=counter, is_items=False)


def _validate_field_spec(spec: object, path: str, *, depth: int, counter: list[int], is_items: bool) -> None:
    counter[0] += 1
    if counter[0] > MAX_SCHEMA_FIELDS:
        raise SchemaError("schema", f"too many fields (the limit is {MAX_SCHEMA_FIELDS})")
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaError(path, f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if not isinstance(spec, dict):
        raise SchemaError(path, f"must be an object, got {_json_type(spec)}")
    if "type" not in spec:
        raise SchemaError(f"{path}.type", "missing (expected one of: " + ", ".join(FIELD_TYPES) + ")")
    field_type = spec["type"]
    if not isinstance(field_type, str) or field_type not in FIELD_TYPES:
        shown = repr(field_type) if isinstance(field_type, str) else _json_type(field_type)
        raise SchemaError(f"{path}.type", f"unknown type {shown} (expected one of: {', '.join(FIELD_TYPES)})")

    allowed = _COMMON_OPTIONS | _TYPE_OPTIONS[field_type]
    if extra := set(spec) - allowed:
        raise SchemaError(path, f"unknown keys {_quoted(extra)} for type '{field_type}'")
    if is_items and "required" in spec:
        raise SchemaError(f"{path}.required", "has no meaning for array items")
    for option in _BOOLEAN_OPTIONS:
        if option in spec and not isinstance(spec[option], bool):
            raise SchemaError(f"{path}.{option}", f"must be true or false, got {_json_type(spec[option])}")
    _validate_description(spec, f"{path}.description")

    if "max_length" in spec:
        max_length = spec["max_length"]
        if not _is_integer(max_length) or max_length < 0:
            raise SchemaError(f"{path}.max_length", "must be a whole number, 0 or more")
    for bound in ("min", "max"):
        if bound in spec and not _is_number(spec[bound]):
            raise SchemaError(f"{path}.{bound}", f"must be a number, got {_json_type(spec[bound])}")
    if "min" in spec and "max" in spec and spec["min"] > spec["max"]:
        raise SchemaError(path, f"min ({spec['min']}) is greater than max ({spec['max']})")
    if "enum" in spec:
        _validate_enum(spec, path)

    if field_type == "object":
        _validate_object_spec(spec, f"{path}.", depth=depth + 1, counter=counter)
    elif field_type == "array" and "items" in spec:
        _validate_field_spec(spec["items"], f"{path}.items", depth=depth + 1, counter=counter, is_items=True)


def _validate_enum(spec: Mapping[str, Any], path: str) -> None:
    enum = spec["enum"]
    if not isinstance(enum, list) or not enum:
        raise SchemaError(f"{path}.enum", "must be a non-empty list")
    if len(enum) > MAX_ENUM_LENGTH:
        raise SchemaError(f"{path}.enum", f"has {len(enum)} values (the limit is {MAX_ENUM_LENGTH})")
    # Each allowed value must itself be valid for the field, or the enum can never match.
    item_spec = {key: value for key, value in spec.items() if key != "enum"}
    for index, value in enumerate(enum):
        problem = _scalar_problem(item_spec, value)
        if value is None or problem is not None:
            raise SchemaError(f"{path}.enum[{index}]", problem or "null is not an allowed value")


def _validate_description(spec: Mapping[str, Any], path: str) -> None:
    if "description" in spec and not isinstance(spec["description"], str):
        raise SchemaError(path, f"must be a string, got {_json_type(spec['description'])}")


# --------------------------------------------------------------------------- payloads


def validate_payload(schema: dict[str, Any], payload: object) -> None:
    """Raise PayloadError listing every problem of `payload` against `schema`.

    Checks run in three stages, each only if the previous one passed: the payload is a
    JSON object made of JSON values (no NaN, no non-string keys, no Python objects) and
    not too deep; it is at most MAX_PAYLOAD_BYTES serialised; it matches the schema. An
    invalid schema raises SchemaError: that is a configuration bug, not the caller's.
    """
    validate_schema_definition(schema)
    check_payload(schema, payload)


def check_payload(schema: dict[str, Any], payload: object) -> None:
    """validate_payload() for a schema that validate_schema_definition() has already
    accepted and that has not changed since: emit() checks each event type's schema once
    per cached row (campaigns/events.py), not once per event."""
    if not isinstance(payload, dict):
        raise PayloadError({"": f"must be a JSON object, got {_json_type(payload)}"})

    errors: dict[str, str] = {}
    _check_json(payload, "", 1, errors)
    if errors:
        raise PayloadError(errors)

    size = len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadError({"": f"is {size} bytes serialised (the limit is {MAX_PAYLOAD_BYTES})"})

    _check_object(schema, payload, "", errors)
    if errors:
        raise PayloadError(errors)


def _add_error(errors: dict[str, str], path: str, message: str) -> None:
    if len(errors) < MAX_REPORTED_ERRORS:
        errors.setdefault(path, message)


def _join(prefix: str, key: str | int) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _check_json(value: object, path: str, depth: int, errors: dict[str, str]) -> None:
    """Record every place where `value` is not plain JSON, without descending too deep."""
    if isinstance(value, dict | list):
        if depth > MAX_PAYLOAD_DEPTH:
            _add_error(errors, path, f"nested deeper than {MAX_PAYLOAD_DEPTH} levels")
            return
        if isinstance(value, list):
            for index, item in enumerate(value):
                _check_json(item, _join(path, index), depth + 1, errors)
            return
        for key, item in value.items():
            if not isinstance(key, str):
                # json.dumps would silently turn 1, True or None into "1", "true", "null".
                _add_error(errors, path, f"object keys must be strings, got {_json_type(key)} key {key!r}")
                continue
            _check_json(item, _join(path, key), depth + 1, errors)
        return
    if isinstance(value, float) and not math.isfinite(value):
        _add_error(errors, path, "NaN and Infinity are not JSON")
    elif value is not None and not isinstance(value, str | int | float):
        hint = "; send an ISO 8601 string" if isinstance(value, date) else ""
        _add_error(errors, path, f"not a JSON value ({type(value).__name__}{hint})")


def _check_object(spec: Mapping[str, Any], value: dict[str, Any], path: str, errors: dict[str, str]) -> None:
    fields: dict[str, Any] = spec.get("fields") or {}
    for name, field_spec in fields.items():
        field_path = _join(path, name)
        if name not in value:
            if field_spec.get("required", False):
                _add_error(errors, field_path, "required field is missing")
            continue
        _check_value(field_spec, value[name], field_path, errors)
    if not _allows_additional_fields(spec):
        for name in value:
            if name not in fields:
                _add_error(errors, _join(path, name), "unknown field (not in the schema)")


def _allows_additional_fields(spec: Mapping[str, Any]) -> bool:
    # Default: closed when fields are declared (typos surface at emit time), open when
    # none are, so that {} and {"type": "object"} accept any object.
    return bool(spec.get("additional_fields", not spec.get("fields")))


def _check_value(spec: Mapping[str, Any], value: object, path: str, errors: dict[str, str]) -> None:
    field_type = spec["type"]
    if value is None:
        if not spec.get("nullable", False):
            _add_error(errors, path, f"expected {field_type}, got null")
        return
    if field_type == "object":
        if not isinstance(value, dict):
            _add_error(errors, path, f"expected object, got {_json_type(value)}")
            return
        _check_object(spec, value, path, errors)
    elif field_type == "array":
        if not isinstance(value, list):
            _add_error(errors, path, f"expected array, got {_json_type(value)}")
            return
        if "max_length" in spec and len(value) > spec["max_length"]:
            _add_error(errors, path, f"has {len(value)} items (max_length {spec['max_length']})")
        if "items" in spec:
            for index, item in enumerate(value):
                _check_value(spec["items"], item, _join(path, index), errors)
    elif (problem := _scalar_problem(spec, value)) is not None:
        _add_error(errors, path, problem)


def _scalar_problem(spec: Mapping[str, Any], value: object) -> str | None:
    """What is wrong with a non-null value for a non-container field, or None."""
    field_type = spec["type"]
    if not _has_type(field_type, value):
        return f"expected {field_type}, got {_json_type(value)}"
    if isinstance(value, str):
        if "max_length" in spec and len(value) > spec["max_length"]:
            return f"is {len(value)} characters long (max_length {spec['max_length']})"
        if field_type == "email" and not _looks_like_email(value):
            return "not a valid email address"
        if field_type == "datetime" and (problem := _datetime_problem(value)) is not None:
            return problem
    if field_type in ("integer", "number"):
        if "min" in spec and value < spec["min"]:  # type: ignore[operator]
            return f"is less than the minimum {spec['min']}"
        if "max" in spec and value > spec["max"]:  # type: ignore[operator]
            return f"is greater than the maximum {spec['max']}"
    # Plain equality is safe here: the type check above already keeps True out of an
    # integer enum that contains 1 (Python says True == 1).
    if "enum" in spec and value not in spec["enum"]:
        shown = ", ".join(json.dumps(allowed, ensure_ascii=False) for allowed in spec["enum"][:20])
        more = ", ..." if len(spec["enum"]) > 20 else ""
        return f"must be one of {shown}{more}"
    return None


def _has_type(field_type: str, value: object) -> bool:
    if field_type in ("string", "email", "datetime"):
        return isinstance(value, str)
    if field_type == "boolean":
        return isinstance(value, bool)
    if field_type == "integer":
        # JSON Schema's rule: 3.0 is an integer; some JSON encoders emit it for whole numbers.
        return _is_integer(value) or (isinstance(value, float) and value.is_integer())
    if field_type == "number":
        return _is_number(value)
    return field_type == "any"


def _looks_like_email(value: str) -> bool:
    # Deliberately simple: the ESP and the bounce pipeline are the real validators. This
    # catches the mistakes that happen in code (empty, a name, a missing domain).
    if len(value) > MAX_EMAIL_LENGTH or any(char.isspace() for char in value):
        return False
    local, at, domain = value.rpartition("@")
    if not at or not local or "@" in local:
        return False
    labels = domain.split(".")
    return len(labels) >= 2 and all(labels)


def _datetime_problem(value: str) -> str | None:
    if not _ISO_DATETIME_PREFIX_RE.match(value):
        return "not an ISO 8601 datetime (expected e.g. 2024-06-01T12:00:00Z)"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return "not an ISO 8601 datetime (expected e.g. 2024-06-01T12:00:00Z)"
    if parsed.tzinfo is None:
        # A naive time is ambiguous by hours; rules and sends compare instants.
        return "datetime needs a timezone offset (e.g. Z or +00:00)"
    return None


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_integer(value)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _quoted(keys: set[Any] | frozenset[Any]) -> str:
    return ", ".join(f"'{key}'" for key in sorted(map(str, keys)))


# --------------------------------------------------------------------------- sensitivity


def sensitive_fields(schema: dict[str, Any]) -> set[str]:
    """Dotted paths of the fields marked sensitive, relative to the payload.

    An array element is written "*": {"items": array of {"card": sensitive}} gives
    "items.*.card", and an array of sensitive strings gives "tags.*". A field inside a
    sensitive object is not listed separately: the whole object is redacted.
    """
    validate_schema_definition(schema)
    return {path for path, spec in _walk_fields(schema, "") if spec.get("sensitive")}


def _walk_fields(spec: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Yield (path, spec) for every field below `spec` (the schema root or a field spec),
    array elements as "*", not descending below a sensitive field."""
    children: list[tuple[str, Mapping[str, Any]]] = []
    if spec.get("type") == "array":
        if "items" in spec:
            children.append((_join(prefix, "*"), spec["items"]))
    elif spec.get("type", "object") == "object":
        children.extend((_join(prefix, name), child) for name, child in (spec.get("fields") or {}).items())
    for path, child in children:
        yield path, child
        if not child.get("sensitive"):
            yield from _walk_fields(child, path)


def _holds_sensitive(spec: Mapping[str, Any]) -> bool:
    return any(child.get("sensitive") for _, child in _walk_fields(spec, ""))


def path_is_sensitive(schema: dict[str, Any], path: str) -> bool:
    """Whether the payload value at `path` ("items.0.card") is, is inside, or holds a
    sensitive field. Used to refuse automation rules that would branch on sensitive data:
    campaigns.rules.rule_fields() gives "payload.<path>" for each comparison. Paths the
    schema does not declare (additional fields) are not sensitive."""
    validate_schema_definition(schema)
    spec: Mapping[str, Any] = schema
    for segment in path.split(".") if path else []:
        if spec.get("type") == "array":
            if not segment.isdigit() or "items" not in spec:
                return False
            spec = spec["items"]
        else:
            fields = spec.get("fields") or {}
            if segment not in fields:
                return False
            spec = fields[segment]
        if spec.get("sensitive"):
            return True
    return _holds_sensitive(spec)


def redact(schema: dict[str, Any], payload: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `payload` with every sensitive value replaced by "[redacted]".

    Meant for logs and admin lists, including payloads that failed validation, so it never
    raises on odd data: when a value does not have the shape the schema declares (say a
    string where an object with a sensitive part is expected) and sensitive data could be
    inside it, the whole value is redacted. Undeclared fields are copied as they are.
    """
    validate_schema_definition(schema)
    return _redact_object(schema, payload, 1)


def _redact_object(spec: Mapping[str, Any], value: Mapping[str, Any], depth: int) -> dict[str, Any]:
    fields = spec.get("fields") or {}
    return {
        key: _redact_value(fields[key], item, depth + 1) if key in fields else _copy(item, depth + 1)
        for key, item in value.items()
    }


def _redact_value(spec: Mapping[str, Any], value: object, depth: int) -> object:
    if spec.get("sensitive"):
        return REDACTED
    if not _holds_sensitive(spec):
        return _copy(value, depth)
    if depth > MAX_PAYLOAD_DEPTH:
        return REDACTED
    if spec["type"] == "object" and isinstance(value, dict):
        return _redact_object(spec, value, depth)
    if spec["type"] == "array" and isinstance(value, list):
        return [_redact_value(spec["items"], item, depth + 1) for item in value]
    return None if value is None else REDACTED


def _copy(value: object, depth: int) -> object:
    # Rebuild containers so the caller can mutate the copy; the depth cap also makes a
    # self-referencing Python structure (a bug upstream) end instead of recursing forever.
    if isinstance(value, dict | list) and depth > MAX_PAYLOAD_DEPTH:
        return "[too deep]"
    if isinstance(value, dict):
        return {key: _copy(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item, depth + 1) for item in value]
    return value
