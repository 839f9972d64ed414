"""The console API's answers, as pydantic models: their JSON schemas are the OpenAPI document's.

Each model lists every field its object's ``to_json`` writes and forbids any other
(``additionalProperties: false``), so that a field added to an answer and not here fails the API tests
(Schemathesis checks every answer against the document), and one described here but no longer written
fails them too (the fields are required).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from quotagate.accounts.models import Role
from quotagate.keys.models import Period

Timestamp = datetime  # ISO 8601 in UTC with a Z (format: date-time)


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Answer):
    code: str = Field(description="Stable, machine-readable: invalid_request, unauthenticated, forbidden, "
                                  "not_found, method_not_allowed, conflict, payload_too_large, ...")
    message: str = Field(description="For people; may change")
    field: str | None = Field(default=None, description="The top-level field of the body (or the query "
                                                        "parameter) at fault, for a 400")


class Error(_Answer):
    """Every console API error: ``{"error": {"code", "message", "field"?}}``."""

    error: ErrorDetail


class User(_Answer):
    id: str
    object: Literal["user"]
    email: str
    is_admin: bool
    created_at: Timestamp


class AccessToken(_Answer):
    id: str
    object: Literal["access_token"]
    name: str
    prefix: str
    kind: Literal["api", "session"] = Field(description="api: made with the API or the CLI; session: a web "
                                                        "console sign-in")
    status: Literal["active", "revoked", "expired"]
    created_at: Timestamp
    last_used_at: Timestamp | None
    expires_at: Timestamp | None
    revoked_at: Timestamp | None


class NewAccessToken(AccessToken):
    token: str = Field(description="The token itself: shown this once, never again")


class AccessTokenList(_Answer):
    object: Literal["list"]
    data: list[AccessToken]


class Project(_Answer):
    id: str
    object: Literal["project"]
    name: str
    models: list[str] | None = Field(description="The model ids the project may use; null: every model")
    rpm: int | None = Field(description="Requests per minute shared by all of the project's keys; null: none")
    tpm: int | None = Field(description="Tokens per minute shared by all of the project's keys; null: none")
    token_limit: int | None = Field(description="A token budget per period shared by all of its keys")
    token_limit_period: Period | None
    role: Role = Field(description="The caller's role in the project (instance admins: owner)")
    created_at: Timestamp
    updated_at: Timestamp


class ProjectPage(_Answer):
    object: Literal["list"]
    data: list[Project]
    has_more: bool
    next_cursor: str | None = Field(description="Pass as `before` for the next page; null on the last")


class Member(_Answer):
    object: Literal["project_member"]
    user_id: str
    email: str
    role: Role
    status: Literal["active", "invited"]
    created_at: Timestamp


class MemberList(_Answer):
    object: Literal["list"]
    data: list[Member]


class Invitation(_Answer):
    object: Literal["invitation"]
    project_id: str
    project_name: str
    role: Role
    invited_at: Timestamp


class InvitationList(_Answer):
    object: Literal["list"]
    data: list[Invitation]


class AuditActor(_Answer):
    id: str | None
    email: str | None


class AuditEvent(_Answer):
    id: str
    object: Literal["audit_event"]
    project_id: str
    action: str
    actor: AuditActor
    target_type: str | None
    target_id: str | None
    details: dict[str, Any] | None
    client_ip: str | None
    user_agent: str | None
    created_at: Timestamp


class AuditLog(_Answer):
    object: Literal["list"]
    data: list[AuditEvent]


class ModelLimits(_Answer):
    rpm: int | None
    tpm: int | None
    token_limit: int | None
    token_limit_period: Period | None


class Key(_Answer):
    """An inference key (never its secret)."""

    id: str
    object: Literal["inference_key"]
    project_id: str
    name: str
    prefix: str = Field(description="The key's first characters and an ellipsis: enough to recognise it")
    rpm: int | None
    tpm: int | None
    token_limit: int | None
    token_limit_period: Period | None
    allowed_models: list[str] | None
    expires_at: Timestamp | None
    status: Literal["active", "revoked", "expired"]
    archived: bool
    created_at: Timestamp
    updated_at: Timestamp
    revoked_at: Timestamp | None
    last_used_at: Timestamp | None
    rotated_from: str | None
    allowed_networks: list[str] | None
    metadata: dict[str, str] | None
    model_limits: dict[str, ModelLimits] | None = Field(
        description="Limits per model id, in addition to the key's own; null: none")


class NewKey(Key):
    secret: str = Field(description="The key itself (qgk_…): shown this once, never again")


class RotatedKey(NewKey):
    previous_key: Key = Field(description="The rotated key as it now is (expiring, or revoked)")


class KeyPage(_Answer):
    object: Literal["list"]
    data: list[Key]
    has_more: bool
    next_cursor: str | None = Field(description="Pass as `before` for the next page; null on the last")


class LeakAnswer(_Answer):
    token_raw: str
    token_type: str
    label: Literal["true_positive", "false_positive"]


class Totals(_Answer):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    errors: int
    rate_limited: int


class Point(Totals):
    avg_latency_ms: float | None


class UsagePoint(Point):
    start: Timestamp
    model: str | None


class KeyTotals(Point):
    key_id: str
    name: str | None
    prefix: str | None
    metadata: dict[str, str] | None


class ModelTotals(Totals):
    model: str | None


class Window(_Answer):
    limit: int
    used: int | None
    remaining: int | None
    window_seconds: int


class Budget(_Answer):
    limit: int
    period: Period | None
    used: int | None
    reserved: int | None
    remaining: int | None
    resets_at: Timestamp | None


class Figures(_Answer):
    rpm: Window | None
    tpm: Window | None
    budget: Budget | None


class ProjectLimits(Figures):
    live: bool = Field(description="Whether the figures are the limiter's live state (false: not available)")


class Limits(ProjectLimits):
    project: Figures | None = Field(default=None, description="The project's limits (shared by all of its "
                                                              "keys), where it has any")
    models: dict[str, Figures] | None = Field(default=None, description="The key's limits per model, where it "
                                                                        "has any")


class KeyUsage(_Answer):
    object: Literal["usage"]
    key_id: str
    project_id: str
    start: Timestamp
    end: Timestamp
    granularity: Literal["minute", "hour", "day"]
    totals: Totals
    data: list[UsagePoint]
    limits: Limits


class ProjectUsage(_Answer):
    object: Literal["usage"]
    project_id: str
    start: Timestamp
    end: Timestamp
    granularity: Literal["minute", "hour", "day"]
    totals: Totals
    data: list[UsagePoint]
    keys: list[KeyTotals]
    models: list[ModelTotals]
    metadata: dict[str, str] | None = Field(description="The metadata filter given (null: none)")
    limits: ProjectLimits | None = Field(description="The project's limits and their live state; null: none")


class Request(_Answer):
    """One request to the LLM API, as a key's (or project's) activity lists it."""

    object: Literal["inference_request"]
    request_id: str
    created_at: Timestamp
    key_id: str | None
    model: str | None
    endpoint: str
    status_code: int
    error_code: str | None
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    latency_ms: float
    ttft_ms: float | None
    client_ip: str | None
    user_agent: str | None


class Activity(_Answer):
    object: Literal["list"]
    data: list[Request]
    has_more: bool
    next_cursor: str | None


class Health(_Answer):
    status: Literal["ok"]


class Webhook(_Answer):
    id: str
    object: Literal["webhook"]
    project_id: str
    url: str
    events: list[str]
    budget_thresholds: list[float]
    enabled: bool
    secret_prefix: str = Field(description="The signing secret's first characters: enough to recognise it")
    created_at: Timestamp
    updated_at: Timestamp


class NewWebhook(Webhook):
    secret: str = Field(description="The signing secret: shown when made or renewed, never again")


class UpdatedWebhook(Webhook):
    secret: str | None = Field(default=None, description="Only when `rotate_secret` was true: the new secret")


class WebhookList(_Answer):
    object: Literal["list"]
    data: list[Webhook]


class Delivery(_Answer):
    id: str = Field(description="The event's id (the quotagate-event-id header): the same on every attempt")
    object: Literal["webhook_delivery"]
    webhook_id: str
    event_type: str
    status: str
    attempts: int
    response_code: int | None
    last_error: str | None
    created_at: Timestamp
    delivered_at: Timestamp | None
    next_attempt_at: Timestamp | None
    attempt_log: list[dict[str, Any]]
    data: dict[str, Any]


class DeliveryPage(_Answer):
    object: Literal["list"]
    data: list[Delivery]
    has_more: bool
    next_cursor: str | None
