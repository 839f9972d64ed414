"""``/openapi.json`` and the API reference page (``/docs/api``) of the console listener.

The page is the same two documents rendered server-side with the web console's Jinja templates: no
script, nothing from a CDN (the console's CSP allows only its own origin, and deployments may be offline).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from quotagate.config import Config
from quotagate.openapi.document import Table, console_document, llm_document

TEMPLATES = Path(__file__).resolve().parent.parent / "web" / "templates"
_METHODS = ("get", "post", "patch", "put", "delete")


def inline_code(text: str) -> Markup:
    """A description's `code` spans as <code>, everything else escaped (descriptions use Markdown's)."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))  # noqa: S704 - escaped first


def _name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def type_text(schema: dict[str, Any]) -> str:
    """A schema as one short line: ``string``, ``integer (1-1000)``, ``list of Key``, ``Key or null``."""
    if "$ref" in schema:
        return _name(schema["$ref"])
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema:
            parts = [type_text(s) for s in schema[combinator]]
            return " or ".join(dict.fromkeys(parts))
    if "const" in schema:
        return orjson.dumps(schema["const"]).decode()
    if "enum" in schema:
        return " | ".join(orjson.dumps(v).decode() for v in schema["enum"])
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        kind = " or ".join(kind)
    if kind == "array":
        return f"list of {type_text(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"object of {type_text(schema['additionalProperties'])}"
    if kind == "null":
        return "null"
    limits = [f"{word} {schema[k]}" for k, word in (
        ("minimum", "≥"), ("maximum", "≤"), ("exclusiveMinimum", ">"), ("minLength", "length ≥"),
        ("maxLength", "length ≤"), ("minItems", "items ≥"), ("maxItems", "items ≤")) if k in schema]
    if "format" in schema:
        limits.insert(0, schema["format"])
    return f"{kind} ({', '.join(limits)})" if limits else str(kind)


def fields(schema: dict[str, Any], components: dict[str, Any]) -> list[dict[str, Any]]:
    """The fields of an object schema (a reference is followed), for a table."""
    if "$ref" in schema:
        schema = components.get(_name(schema["$ref"]), {})
    required = set(schema.get("required", []))
    return [{"name": name, "type": type_text(prop), "required": name in required,
             "description": prop.get("description", ""), "default": prop.get("default")}
            for name, prop in schema.get("properties", {}).items()]


def operations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The document's operations, grouped by tag in the order they first appear."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for path, item in doc["paths"].items():
        for method in _METHODS:
            op = item.get(method)
            if op is None:
                continue
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            answers = []
            for status, answer in op["responses"].items():
                types = [f"{media}: {type_text(c.get('schema', {}))}" for media, c in answer.get("content", {}).items()]
                answers.append({"status": status, "description": answer["description"], "types": types})
            groups.setdefault(op["tags"][0], []).append({
                "id": op["operationId"], "method": method.upper(), "path": path, "summary": op["summary"],
                "description": op.get("description", ""), "public": op.get("security") == [],
                "params": op.get("parameters", []), "body": body,
                "body_type": type_text(body) if body else None,
                "body_fields": fields(body, doc["components"]["schemas"]) if body else [],
                "answers": answers})
    return [{"tag": tag, "operations": ops} for tag, ops in groups.items()]


def reference_routes(table: Table, config: Config) -> list[BaseRoute]:
    """``GET /openapi.json`` (the console API's document) and ``GET /docs/api`` (both APIs, as a page)."""
    catalog = {m.id: m.type for m in config.models.values()}
    console = cache(lambda: console_document(list(table), catalog))
    llm = cache(lambda: llm_document(catalog))
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.globals.update(type_text=type_text, fields=fields)
    templates.env.filters["code"] = inline_code

    async def document(_request: Request) -> Response:
        return Response(orjson.dumps(console()), media_type="application/json")

    async def page(request: Request) -> Response:
        apis = [{"id": name, "doc": doc, "where": where, "groups": operations(doc)} for name, doc, where in (
            ("console", console(), "the console port (this one)"), ("llm", llm(), "the LLM port"))]
        return templates.TemplateResponse(request, "api_reference.html", {"apis": apis})

    routes: list[tuple[str, Callable[[Request], Any]]] = [("/openapi.json", document), ("/docs/api", page)]
    return [Route(path, endpoint, methods=["GET"]) for path, endpoint in routes]
