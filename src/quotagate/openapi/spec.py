"""What the OpenAPI document says of one operation, declared on the handler that serves it.

A console API handler carries its ``Operation`` (``@operation(...)``): the body model it validates with,
the query parameters it reads, the answer it gives. The document (``openapi/document.py``) is built from
the route table and these, so a route cannot be served without being described; the body and answer
schemas are the pydantic models' own JSON schemas, so a field cannot change in one and not the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

F = TypeVar("F", bound=Callable[..., Any])
ATTRIBUTE = "__openapi__"
# Set on a field that takes a model id (its value: the model type it must have, or "any"): the served
# document lists the instance's catalog there.
MODEL_ID = "x-quotagate-model-id"


@dataclass(frozen=True, slots=True)
class Param:
    """A query (or path) parameter: its name, JSON schema and what it means."""

    name: str
    schema: dict[str, Any]
    description: str
    where: str = "query"
    required: bool = False

    def to_openapi(self) -> dict[str, Any]:
        return {"name": self.name, "in": self.where, "required": self.required or self.where == "path",
                "description": self.description, "schema": self.schema}


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation: ``body`` is the pydantic model the handler validates its body with (None: no body);
    ``answer`` the model of its success answer (None: no body, as for 204); ``role`` the least project role
    that may call it; ``errors`` the statuses it answers besides those every operation may give."""

    summary: str
    tag: str
    status: int = 200
    body: type[BaseModel] | None = None
    body_schema: dict[str, Any] | None = None   # a body no pydantic model holds (a JSON list)
    answer: type[BaseModel] | None = None
    answer_schema: dict[str, Any] | None = None  # an answer no pydantic model holds (a JSON list)
    models: tuple[type[BaseModel], ...] = ()      # models the two schemas above refer to
    answer_media: str = "application/json"
    extra_media: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. text/csv beside the JSON
    params: tuple[Param, ...] = ()
    role: str | None = None
    errors: tuple[int, ...] = ()
    description: str = ""
    public: bool = False   # needs no access token

    @property
    def param_names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.params if p.where == "query")


def operation(summary: str, tag: str, **kwargs: Any) -> Callable[[F], F]:
    """Declare what a handler does, for the document (see ``Operation``)."""
    op = Operation(summary=summary, tag=tag, **kwargs)

    def mark(handler: F) -> F:
        setattr(handler, ATTRIBUTE, op)
        return handler

    return mark


def operation_of(handler: Callable[..., Any]) -> Operation:
    """The handler's ``Operation``; a handler without one is a bug the document's tests catch."""
    op = getattr(handler, ATTRIBUTE, None)
    if not isinstance(op, Operation):
        raise LookupError(f"{getattr(handler, '__qualname__', handler)!r} has no @operation: every route "
                          "must be described in the OpenAPI document")
    return op
