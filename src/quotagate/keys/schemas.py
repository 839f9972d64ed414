"""Validated inputs of the key API: the product page's mint body, edits, rotation."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from ipaddress import ip_network
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, WithJsonSchema, field_validator

from quotagate.errors import InvalidRequest
from quotagate.keys.models import Period
from quotagate.openapi.spec import MODEL_ID
from quotagate.validation import EDITED_NAME_SCHEMA, NAME_SCHEMA, clean_name

_STRICT = ConfigDict(extra="forbid", strict=True)
# Limits stay within what every JSON client reads exactly (2**53).
MAX_LIMIT = 2**53 - 1
MAX_GRACE_SECONDS = 30 * 86400
Limit = Annotated[StrictInt, Field(gt=0, le=MAX_LIMIT)]
ModelList = Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=200,
                                                      json_schema_extra={MODEL_ID: "any"})]],
                      Field(min_length=1, max_length=1000)]


def parse_timestamp(value: object) -> datetime:
    """An ISO 8601 timestamp with a time zone (``Z`` or an offset), or Unix seconds, as UTC."""
    if isinstance(value, bool):
        raise ValueError("must be an ISO 8601 timestamp")
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"{value!r} is out of range") from None
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 timestamp")
    shown = value if len(value) <= 40 else value[:40] + "…"
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{shown!r} is not an ISO 8601 timestamp (e.g. 2030-01-31T00:00:00Z)") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{shown!r} has no time zone; add Z for UTC")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 has no UTC equivalent
        raise ValueError(f"{shown!r} is out of range") from None


def check_budget_pair(token_limit: int | None, token_limit_period: str | None) -> None:
    """``token_limit`` and ``token_limit_period`` come together; the error names the missing one."""
    if (token_limit is None) != (token_limit_period is None):
        missing = "token_limit_period" if token_limit_period is None else "token_limit"
        raise InvalidRequest(f"{missing}: token_limit and token_limit_period come together; give both or "
                             "neither", field=missing)


MAX_NETWORKS = 64
MAX_METADATA = 16
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
MetadataKey = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]+$")]
MetadataValue = Annotated[StrictStr, Field(max_length=256)]


def metadata_filter(entries: list[str]) -> dict[str, str]:
    """The usage API's ``metadata=KEY=VALUE`` parameters (repeatable; a key must have them all) as a dict.
    ``=`` splits them because a metadata key cannot hold one (``:`` and ``/`` it can)."""
    if len(entries) > MAX_METADATA:
        raise InvalidRequest(f"metadata: at most {MAX_METADATA} filters, not {len(entries)}", field="metadata")
    found: dict[str, str] = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        if not sep:
            raise InvalidRequest(f"metadata: expected KEY=VALUE (e.g. team=search), not {entry[:80]!r}",
                                 field="metadata")
        if not METADATA_KEY.fullmatch(name):
            raise InvalidRequest(f"metadata: {name[:80]!r} is not a metadata key (1-64 letters, digits and "
                                 "_ . : / -)", field="metadata")
        if len(value) > 256:
            raise InvalidRequest(f"metadata: the value of {name!r} is longer than 256 characters, which no key "
                                 "has", field="metadata")
        if name in found:
            raise InvalidRequest(f"metadata: {name!r} is given twice; a key has one value for it",
                                 field="metadata")
        found[name] = value
    return found


def parse_network(value: str) -> str:
    """A CIDR network (or a single address) in its normal form; an error naming the problem otherwise."""
    try:
        return str(ip_network(value.strip(), strict=True))
    except ValueError as exc:
        if "host bits set" in str(exc):
            loose = ip_network(value.strip(), strict=False)
            raise ValueError(f"{value!r} has host bits set; the network is {loose}") from None
        raise ValueError(f"{value[:60]!r} is not an IP network in CIDR form (10.0.0.0/8, 2001:db8::/32) "
                         "or an address") from None


MAX_MODEL_LIMITS = 1000


class ModelLimits(BaseModel):
    """A key's limits on one model (``model_limits``): the same four as the key's own, each optional, at
    least one of rpm, tpm and token_limit given (``check_model_limits``; the document says so too)."""

    model_config = ConfigDict(**_STRICT, json_schema_extra={"anyOf": [
        {"required": [name], "properties": {name: {"type": "integer"}}} for name in ("rpm", "tpm", "token_limit")]})

    rpm: Limit | None = None
    tpm: Limit | None = None
    token_limit: Limit | None = None
    token_limit_period: Period | None = None


def check_model_limits(value: dict[str, ModelLimits] | None) -> dict[str, dict[str, Any]] | None:
    """``model_limits`` as stored (plain JSON), after the checks that span fields; errors name the entry.
    An empty map is no per-model limits at all (stored as null)."""
    if not value:
        return None
    out: dict[str, dict[str, Any]] = {}
    for model, limits in value.items():
        field = f"model_limits.{model}"
        if limits.token_limit is None and limits.token_limit_period is not None:
            raise InvalidRequest(f"{field}.token_limit: token_limit and token_limit_period come together; "
                                 "give both or neither", field=f"{field}.token_limit")
        if limits.token_limit is not None and limits.token_limit_period is None:
            raise InvalidRequest(f"{field}.token_limit_period: token_limit and token_limit_period come together; "
                                 "give both or neither", field=f"{field}.token_limit_period")
        if limits.rpm is None and limits.tpm is None and limits.token_limit is None:
            raise InvalidRequest(f"{field}: give at least one of rpm, tpm, token_limit (or leave the model out)",
                                 field=field)
        out[model] = limits.model_dump()
    return out


class _Limits(BaseModel):
    model_config = _STRICT

    rpm: Limit | None = None
    tpm: Limit | None = None
    token_limit: Limit | None = None
    token_limit_period: Period | None = None
    allowed_models: ModelList | None = None
    # The schemas these fields' validators check (they say what the OpenAPI document shows).
    expires_at: Annotated[datetime, WithJsonSchema({"anyOf": [
        {"type": "string", "format": "date-time"}, {"type": "number"}],
        "description": "In the future: ISO 8601 with a time zone, or Unix seconds"})] | None = None
    allowed_networks: Annotated[list[Annotated[StrictStr, WithJsonSchema({
        "type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}],
        "description": "An address, or a network in CIDR form (10.0.0.0/8)"})]],
        Field(min_length=1, max_length=MAX_NETWORKS)] | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA), WithJsonSchema({
        "type": "object", "maxProperties": MAX_METADATA, "additionalProperties": {"type": "string", "maxLength": 256},
        "propertyNames": {"minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_.:/-]+$"}})] | None = None
    model_limits: Annotated[dict[Annotated[StrictStr, Field(min_length=1, max_length=200,
                                                            json_schema_extra={MODEL_ID: "any"})], ModelLimits],
                            Field(max_length=MAX_MODEL_LIMITS)] | None = None

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(dict.fromkeys(parse_network(v) for v in value))

    @field_validator("expires_at", mode="before")
    @classmethod
    def _timestamp(cls, value: object) -> datetime | None:
        return None if value is None else parse_timestamp(value)

    @field_validator("allowed_models")
    @classmethod
    def _dedupe(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(dict.fromkeys(value))


class KeyCreate(_Limits):
    name: StrictStr = Field(min_length=1, max_length=200, json_schema_extra=NAME_SCHEMA)

    _clean_name = field_validator("name")(clean_name)

    def check(self) -> None:
        """The checks that span fields (pydantic's own reach one field at a time)."""
        check_budget_pair(self.token_limit, self.token_limit_period)


class KeyUpdate(_Limits):
    """Only the fields present change; ``null`` clears a limit (unlimited) or the expiry."""

    model_config = ConfigDict(**_STRICT, json_schema_extra={"minProperties": 1})  # the service refuses {}

    name: Annotated[StrictStr | None, WithJsonSchema(EDITED_NAME_SCHEMA)] = Field(default=None, min_length=1,
                                                                                    max_length=200)

    @field_validator("name")
    @classmethod
    def _clean(cls, value: str | None) -> str | None:
        return None if value is None else clean_name(value)


class RotateRequest(BaseModel):
    model_config = _STRICT

    grace_period_seconds: StrictInt = Field(default=0, ge=0, le=MAX_GRACE_SECONDS)
    name: StrictStr | None = Field(default=None, min_length=1, max_length=200, json_schema_extra=NAME_SCHEMA)

    @field_validator("name")
    @classmethod
    def _clean(cls, value: str | None) -> str | None:
        return None if value is None else clean_name(value)
