"""Turning request bodies into validated models, with errors that name the field."""

from __future__ import annotations

import unicodedata
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from quotagate.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)


def _path(loc: tuple[int | str, ...]) -> str:
    """``("allowed_models", 0)`` as ``allowed_models[0]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problem(err: Any) -> tuple[str | None, str, str]:
    """One pydantic problem as (top-level field, full path, message without the path)."""
    loc = tuple(err["loc"])
    field = str(loc[0]) if loc else None
    if err["type"] == "extra_forbidden":
        return field, _path(loc), "unknown field"
    if err["type"] == "missing":
        return field, _path(loc), "is required"
    return field, _path(loc), err["msg"].removeprefix("Value error, ")


def describe(exc: ValidationError) -> InvalidRequest:
    """The first problem of a pydantic error as an InvalidRequest naming its field.

    ``field`` is the top-level field of the body (``allowed_models``); the message gives the full path
    (``allowed_models[0]``) when the problem lies inside it."""
    err = exc.errors()[0]
    field, path, msg = _problem(err)
    if err["type"] == "extra_forbidden":
        return InvalidRequest(f"unknown field {path!r}", field=field)
    return InvalidRequest(f"{path}: {msg}" if path else msg, field=field)


def problems(exc: ValidationError) -> dict[str, str]:
    """Every field's problem (its first), by top-level field, with the API's wording but without the
    field's name in front: for forms, which show each message next to its own field, all at once."""
    out: dict[str, str] = {}
    for err in exc.errors():
        field, _path_text, msg = _problem(err)
        out.setdefault(field or "form", msg)
    return out


def parse_model(model: type[M], data: Any) -> M:
    """Validate already-decoded JSON ``data`` as ``model``, raising InvalidRequest."""
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise describe(exc) from None


def parse_json_body(model: type[M], body: bytes) -> M:
    """Decode ``body`` as JSON and validate it as ``model``, raising InvalidRequest."""
    if not body.strip():
        data: Any = {}
    else:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    return parse_model(model, data)


# ``clean_name``'s rule as JSON Schema states it (for the OpenAPI document): a character that is neither
# blank nor a control character, and no control character anywhere.
NAME_SCHEMA: dict[str, Any] = {"pattern": r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"}
# A name that an edit may leave out but not set to null (the services refuse null): its schema.
EDITED_NAME_SCHEMA: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": 200, **NAME_SCHEMA}


def clean_name(value: str) -> str:
    """A display name: surrounding blanks stripped; blank or control characters refused.

    Control characters (NUL above all, which PostgreSQL cannot store in text) are refused here so that
    both stores accept exactly the same names."""
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("must not contain control characters")
    return value
