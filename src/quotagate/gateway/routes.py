"""The LLM API's route table: (path, method) → the endpoint name that usage, metrics and the OpenAPI
document (``openapi/llm.py``, one operation per path here) know it by."""

from __future__ import annotations

# Exact paths. The gateway looks a request's path up here first: one dict lookup per request.
ROUTES: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": ("chat.completions", "POST"),
    "/v1/completions": ("completions", "POST"),
    "/v1/embeddings": ("embeddings", "POST"),
    "/v1/rerank": ("rerank", "POST"),
    "/v1/score": ("score", "POST"),
    "/v1/responses": ("responses", "POST"),
    "/v1/models": ("models", "GET"),
}
# One path with a parameter: ``GET /v1/models/{model}``, matched by its prefix.
MODEL_PREFIX = "/v1/models/"
MODEL_ROUTE = ("/v1/models/{model}", "models", "GET")
# Outside the API: no key needed.
HEALTH = "/healthz"
OPENAPI = "/openapi.json"


def templates() -> dict[str, str]:
    """Every API path (with its parameter written as OpenAPI writes it) and its method."""
    return {**{path: method for path, (_endpoint, method) in ROUTES.items()}, MODEL_ROUTE[0]: MODEL_ROUTE[2]}
