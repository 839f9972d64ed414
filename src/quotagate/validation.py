"""Turning request bodies into validated models, with errors that name the field."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from quotagate.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)


def describe(exc: ValidationError) -> InvalidRequest:
    """The first problem of a pydantic error as an InvalidRequest naming its field."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or None
    if err["type"] == "extra_forbidden":
        message = f"unknown field {field!r}"
    elif err["type"] == "missing":
        message = f"{field}: is required"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        message = f"{field}: {msg}" if field else msg
    return InvalidRequest(message, field=field)


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
