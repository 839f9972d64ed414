"""The OpenAPI 3.1 documents of the console API and of the LLM API, built from the route tables and the
``Operation`` of each route (``openapi/spec.py``): nothing in them is written by hand beside the code.

Schemas are the pydantic models' own JSON schemas (request bodies in their validation form, answers in
their serialization form), gathered under ``components/schemas``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from quotagate import __version__
from quotagate.openapi import answers, llm
from quotagate.openapi.spec import MODEL_ID, Operation, Param, operation_of

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"
# What each error status means, on either API (the shapes differ: see the Error schema of each).
CONSOLE_ERRORS = {
    400: "The request is invalid: the body or a query parameter (`field` names it)",
    401: "No access token, or a malformed, unknown, expired or revoked one",
    403: "Your role in the project is too low for this",
    404: "No such resource, or not yours (the two are answered alike)",
    409: "The resource's state forbids it",
    413: "The request body is too large",
    429: "Too many requests from this address; wait and retry",
}
LLM_ERRORS = {
    400: "`invalid_request_error`: the body is invalid (`param` names the field)",
    401: "`invalid_api_key`, `key_revoked` or `key_expired`",
    403: "`model_not_allowed` for this key, or `network_not_allowed` from this address",
    404: "`model_not_found`",
    413: "`payload_too_large`: the body is larger than the gateway accepts",
    415: "`unsupported_media_type`: a Content-Encoding other than gzip or deflate",
    429: "`rate_limit_exceeded` (rpm, tpm) or `token_limit_exceeded` (the budget), with Retry-After and "
         "x-should-retry",
    502: "`upstream_error`: the model server failed",
    503: "`limiter_unavailable` or `service_unavailable`: retry after Retry-After",
    504: "`upstream_timeout`: the model server did not answer in time",
}
Catalog = Mapping[str, str]  # model id: its type (chat, embedding, rerank)
Table = Iterable[tuple[str, str, Callable[..., Any]]]
_PATH_PARAM = re.compile(r"{(\w+)}")


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


class _Schemas:
    """The components/schemas of one document: every model named, in the form it is used in."""

    def __init__(self, inputs: list[type[BaseModel]], outputs: list[type[BaseModel]]) -> None:
        keyed = [(m, "validation") for m in dict.fromkeys(inputs)] + [(m, "serialization")
                                                                       for m in dict.fromkeys(outputs)]
        refs, top = models_json_schema(keyed, ref_template=REF)  # type: ignore[arg-type]
        self.refs: dict[tuple[Any, str], dict[str, Any]] = {key: schema for key, schema in refs.items()}
        self.components: dict[str, Any] = top.get("$defs", {})

    def ref(self, model: type[BaseModel], mode: str) -> dict[str, Any]:
        return self.refs[(model, mode)]


def _short_refs(schema: Any) -> Any:
    """``{"$ref": "Name"}`` (as operations write them) as a reference into components/schemas."""
    if isinstance(schema, dict):
        return {k: (REF.format(model=v) if k == "$ref" and "/" not in v else _short_refs(v))
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_short_refs(v) for v in schema]
    return schema


def _catalog(schema: Any, catalog: Catalog | None) -> Any:
    """Model id fields (marked ``MODEL_ID``) list the catalog's ids of their type, when the document knows
    the catalog (the one an instance serves does)."""
    if isinstance(schema, dict):
        out = {k: _catalog(v, catalog) for k, v in schema.items() if k != MODEL_ID}
        kind = schema.get(MODEL_ID)
        if kind and catalog is not None:
            out["enum"] = sorted(m for m, t in catalog.items() if kind in ("any", t))
        return out
    if isinstance(schema, list):
        return [_catalog(v, catalog) for v in schema]
    return schema


def _error(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description,
                              "content": {"application/json": {"schema": {"$ref": REF.format(model=schema)}}}}
    if headers:
        answer["headers"] = headers
    return answer


def _operation(op: Operation, path: str, method: str, schemas: _Schemas, statuses: dict[int, str],
               error_schema: str, headers: dict[str, Any] | None) -> dict[str, Any]:
    params = [Param(name, {"type": "string"}, f"The {name}", where="path", required=True)
              for name in _PATH_PARAM.findall(path)]
    out: dict[str, Any] = {
        "operationId": f"{method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', path)}".rstrip("_"),
        "summary": op.summary, "tags": [op.tag],
        "description": " ".join(filter(None, [op.description, f"Role: at least `{op.role}` in the project."
                                              if op.role else ""])),
        "parameters": [p.to_openapi() for p in (*params, *op.params)],
    }
    if op.body is not None or op.body_schema is not None:
        schema = op.body_schema or schemas.ref(op.body, "validation")  # type: ignore[arg-type]
        # Required if a field is, or if an empty body is refused (an edit must change something).
        required = op.body_schema is not None or bool(op.body and (any(
            f.is_required() for f in op.body.model_fields.values()) or "minProperties" in schema_of(op.body)))
        out["requestBody"] = {"required": required, "content": {"application/json": {"schema": schema}}}
    success: dict[str, Any] = {"description": "Success"}
    if op.answer is not None or op.answer_schema is not None:
        schema = op.answer_schema or schemas.ref(op.answer, "serialization")  # type: ignore[arg-type]
        success["content"] = {op.answer_media: {"schema": schema}, **op.extra_media}
    if headers:
        success["headers"] = headers
    out["responses"] = {str(op.status): success}
    codes = set(op.errors)
    if error_schema == "Error":  # the console API's plumbing answers these on every operation
        codes |= {400, 413}
        if not op.public:
            codes.add(401)
        if op.role:
            codes.add(403)
        if params:
            codes.add(404)
    for code in sorted(codes):
        out["responses"][str(code)] = _error(statuses[code], error_schema, headers)
    if op.public:
        out["security"] = []
    return out


def _document(title: str, description: str, paths: list[tuple[str, str, Operation]], statuses: dict[int, str],
              error_model: type[BaseModel], security: dict[str, Any], headers: dict[str, Any] | None,
              catalog: Catalog | None) -> dict[str, Any]:
    inputs = [op.body for _p, _m, op in paths if op.body is not None]
    outputs = [error_model, *(op.answer for _p, _m, op in paths if op.answer is not None),
               *(m for _p, _m, op in paths for m in op.models)]
    schemas = _Schemas(inputs, outputs)
    built: dict[str, dict[str, Any]] = {}
    for path, method, op in paths:
        built.setdefault(path, {})[method.lower()] = _operation(op, path, method, schemas, statuses,
                                                                error_model.__name__, headers)
    doc = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": __version__, "description": description},
        "servers": [{"url": "/"}],
        "paths": built,
        "components": {"schemas": schemas.components, "securitySchemes": security},
        "security": [{name: []} for name in security],
    }
    return _catalog(_short_refs(doc), catalog)  # type: ignore[no-any-return]


def console_document(table: Table, catalog: Catalog | None = None) -> dict[str, Any]:
    """The console API's document, from its route table (``ConsoleAPI.table``); ``catalog``: the
    instance's models, listed where a model id is asked for."""
    paths = [(path, method, operation_of(handler)) for method, path, handler in table]
    paths.append(("/healthz", "GET", Operation("Health check", "Instance", answer=answers.Health, public=True)))
    paths.append(("/openapi.json", "GET", Operation(
        "This document", "Instance", answer_schema={"type": "object"}, public=True)))
    paths.append(("/metrics", "GET", Operation(
        "Prometheus metrics", "Instance", answer_schema={"type": "string"}, answer_media="text/plain", errors=(403,),
        description="Instance admins only (or scrape the metrics listener, QUOTAGATE_METRICS_PORT).")))
    security = {"accessToken": {"type": "http", "scheme": "bearer", "description": (
        "A user's access token (qgt_…): `quotagate tokens create EMAIL` or POST /v1/me/access-tokens")}}
    return _document("quotagate console API", "Projects, members, access tokens, inference keys, usage and the "
                     "audit log. Errors are `{\"error\": {\"code\", \"message\", \"field\"?}}`.", paths,
                     CONSOLE_ERRORS, answers.Error, security, None, catalog)


def llm_document(catalog: Catalog | None = None) -> dict[str, Any]:
    """The LLM API's document, from the gateway's route table (``gateway/routes.py``)."""
    from quotagate.gateway.routes import HEALTH, OPENAPI, templates

    paths = []
    for path, method in templates().items():
        op = llm.OPERATIONS.get(path)
        if op is None:
            raise LookupError(f"{method} {path} has no operation in openapi/llm.py")
        paths.append((path, method, op))
    paths.append((HEALTH, "GET", llm.HEALTH_OPERATION))
    paths.append((OPENAPI, "GET", llm.OPENAPI_OPERATION))
    security = {"inferenceKey": {"type": "http", "scheme": "bearer",
                                 "description": "An inference key (qgk_…), minted in the console"}}
    headers = {"x-request-id": {"description": "The request's id, as the key's activity shows it", "required": True,
                                "schema": {"type": "string"}}}
    return _document("quotagate LLM API", "OpenAI-compatible: the official SDKs work with base_url set to it. "
                     "Every request is checked against the key's limits before it reaches a model server. "
                     "Errors are OpenAI's `{\"error\": {\"message\", \"type\", \"code\", \"param\"}}`.",
                     paths, LLM_ERRORS, llm.Error, security, headers, catalog)
