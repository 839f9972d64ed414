"""Validated inputs of the accounts API."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictStr, WithJsonSchema, field_validator

from quotagate.accounts.models import Role
from quotagate.keys.models import Period
from quotagate.keys.schemas import Limit
from quotagate.openapi.spec import MODEL_ID
from quotagate.validation import EDITED_NAME_SCHEMA, NAME_SCHEMA, clean_name

_STRICT = ConfigDict(extra="forbid", strict=True)
# Deliberately loose (mail servers decide what a local part may hold), but never blanks or control characters.
EMAIL_PATTERN = r"^[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]{1,255}$"
_name = clean_name
ModelId = Annotated[StrictStr, Field(json_schema_extra={MODEL_ID: "any"})]  # the catalog's (checked by the service)


class ProjectCreate(BaseModel):
    model_config = _STRICT
    name: StrictStr = Field(min_length=1, max_length=200, json_schema_extra=NAME_SCHEMA)
    models: list[ModelId] | None = Field(default=None, min_length=1, max_length=1000)

    _clean_name = field_validator("name")(_name)


class ProjectUpdate(BaseModel):
    """Only the fields present change; ``null`` clears a limit (the project's keys are then bound by their
    own limits only)."""

    model_config = ConfigDict(**_STRICT, json_schema_extra={"minProperties": 1})  # the service refuses {}
    name: Annotated[StrictStr | None, WithJsonSchema(EDITED_NAME_SCHEMA)] = Field(default=None, min_length=1,
                                                                                    max_length=200)
    models: list[ModelId] | None = Field(default=None, min_length=1, max_length=1000)
    rpm: Limit | None = None
    tpm: Limit | None = None
    token_limit: Limit | None = None
    token_limit_period: Period | None = None

    @field_validator("name")
    @classmethod
    def _clean(cls, value: str | None) -> str | None:
        return None if value is None else _name(value)


class MemberAdd(BaseModel):
    model_config = _STRICT
    email: StrictStr = Field(pattern=EMAIL_PATTERN, max_length=320)
    role: Role = "member"


class MemberUpdate(BaseModel):
    model_config = _STRICT
    role: Role


class TokenCreate(BaseModel):
    model_config = _STRICT
    name: StrictStr = Field(default="console", min_length=1, max_length=200, json_schema_extra=NAME_SCHEMA)

    _clean_name = field_validator("name")(_name)
