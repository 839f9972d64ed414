"""Clients and small helpers for the gateway's tests."""

from __future__ import annotations

from typing import Any

import httpx
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Gateway


def sdk(gw: Gateway, secret: str) -> OpenAI:
    return OpenAI(base_url=gw.llm_url, api_key=secret, max_retries=0, timeout=30)


def async_sdk(gw: Gateway, secret: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gw.llm_url, api_key=secret, max_retries=0, timeout=60)


def raw(gw: Gateway, secret: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.Client(base_url=gw.llm_url, headers=headers, timeout=30)


def budget_remaining(gw: Gateway, secret: str) -> int:
    """The key's remaining tokens as the gateway reports them (limit - used - reserved), read without
    spending anything (GET /v1/models is not admitted against the limits)."""
    with raw(gw, secret) as client:
        r = client.get("/models")
    assert r.status_code == 200, r.text
    return int(r.headers["x-ratelimit-remaining-tokens"])


def hi(content: str = "hi") -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` on the gateway's /metrics whose labels include ``labels``."""
    text = gw.metrics()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
