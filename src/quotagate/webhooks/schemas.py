"""Validated inputs of the webhook API (CONTRACT §6)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator
from pydantic.json_schema import SkipJsonSchema

EventType = Literal["key.budget_threshold", "project.budget_threshold", "key.revoked", "key.expiring",
                    "key.leaked"]
EVENT_TYPES: tuple[EventType, ...] = ("key.budget_threshold", "project.budget_threshold", "key.revoked",
                                "key.expiring", "key.leaked")
TEST_EVENT = "webhook.test"  # sent by POST .../test whatever the webhook subscribes to
DEFAULT_THRESHOLDS = (0.5, 0.8, 1.0)
MAX_URL = 2000
_STRICT = ConfigDict(extra="forbid", strict=True)
# What ``check_url`` takes, for the OpenAPI document (it also refuses credentials, fragments and blanks).
UNIQUE: dict[str, Any] = {"uniqueItems": True}  # the validators refuse a value listed twice
URL_SCHEMA: dict[str, Any] = {
    "pattern": "^https?://[^/?#@:\\s\\[\\]\\x00-\\x1f\\x7f]+(?::[0-9]{1,4})?"
                                "(?:[/?][^#\\s\\x00-\\x1f\\x7f]*)?$"}

Threshold = Annotated[float, Field(gt=0, le=1)]


def check_url(value: str) -> str:
    """An absolute http(s) URL with a host, no credentials and no fragment."""
    value = value.strip()
    try:
        parts = urlsplit(value)
        port = parts.port  # raises for a port that is not a number or out of range
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@); put a token in the path or query instead")
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain blanks or control characters")
    del port
    return value


def _events(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError("lists an event type twice")
    return sorted(value, key=EVENT_TYPES.index)


def _thresholds(value: list[float]) -> list[float]:
    if len(set(value)) != len(value):
        raise ValueError("lists a threshold twice")
    return sorted(value)


class WebhookCreate(BaseModel):
    model_config = _STRICT

    url: StrictStr = Field(min_length=1, max_length=MAX_URL, json_schema_extra=URL_SCHEMA)
    events: list[EventType] = Field(default_factory=lambda: list(EVENT_TYPES), min_length=1, max_length=16,
                                    json_schema_extra=UNIQUE)
    budget_thresholds: list[Threshold] = Field(default_factory=lambda: list(DEFAULT_THRESHOLDS),
                                               min_length=1, max_length=10, json_schema_extra=UNIQUE)

    _url = field_validator("url")(check_url)
    _ev = field_validator("events")(_events)
    _th = field_validator("budget_thresholds")(_thresholds)


def _shown(extra: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A PATCH field's schema as the document shows it: ``extra`` added, and no ``default: null`` (null is
    refused; an absent field is left as it is)."""

    def edit(schema: dict[str, Any]) -> None:
        schema.pop("default", None)
        schema.update(extra)

    return edit


class WebhookUpdate(BaseModel):
    """Only the fields given change; null is refused (the service says so), so the document shows none."""

    model_config = ConfigDict(**_STRICT, json_schema_extra={"minProperties": 1})

    url: Annotated[StrictStr, Field(min_length=1, max_length=MAX_URL)] | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_shown({**URL_SCHEMA}))
    events: Annotated[list[EventType], Field(min_length=1, max_length=16)] | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_shown(UNIQUE))
    budget_thresholds: Annotated[list[Threshold], Field(min_length=1, max_length=10)] | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_shown(UNIQUE))
    enabled: StrictBool | SkipJsonSchema[None] = Field(default=None, json_schema_extra=_shown({}))
    rotate_secret: StrictBool | SkipJsonSchema[None] = Field(  # true: a new secret, shown in this answer only
        default=None, json_schema_extra=_shown({}))

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value)

    @field_validator("events")
    @classmethod
    def _ev(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _events(value)

    @field_validator("budget_thresholds")
    @classmethod
    def _th(cls, value: list[float] | None) -> list[float] | None:
        return None if value is None else _thresholds(value)
