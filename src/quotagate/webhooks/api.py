"""The webhook routes of the console API (CONTRACT §6), as (method, path, handler) for ``ConsoleAPI.routes``.

Handlers that take a body check the caller's access first (404 for a stranger, 403 for a role too low),
as the rest of the console API does; only then is the body validated."""

from __future__ import annotations

from collections.abc import Callable

from quotagate.console.api import check_params, page_limit
from quotagate.console.http import Call, Handler, Result
from quotagate.webhooks.schemas import WebhookCreate, WebhookUpdate
from quotagate.webhooks.service import WebhookService

BASE = "/v1/projects/{projectId}/webhooks"
DELIVERY_PARAMS = frozenset({"limit", "before", "status"})


class WebhookAPI:
    def __init__(self, service: WebhookService, wake: Callable[[], None] = lambda: None) -> None:
        self.service = service
        self.wake = wake  # the local webhook loop: a test event goes out now rather than at its next poll

    def create(self, call: Call) -> Result:
        self.service.authorize(call.actor, call.path["projectId"], None, "owner")
        hook, secret = self.service.create(call.actor, call.path["projectId"], call.json(WebhookCreate))
        return 201, {**hook, "secret": secret}

    def list_webhooks(self, call: Call) -> Result:
        return 200, {"object": "list", "data": self.service.list_webhooks(call.actor, call.path["projectId"])}

    def get(self, call: Call) -> Result:
        return 200, self.service.get(call.actor, call.path["projectId"], call.path["webhookId"])

    def update(self, call: Call) -> Result:
        project_id, webhook_id = call.path["projectId"], call.path["webhookId"]
        self.service.authorize(call.actor, project_id, webhook_id, "owner")
        hook, secret = self.service.update(call.actor, project_id, webhook_id, call.json(WebhookUpdate))
        return 200, hook if secret is None else {**hook, "secret": secret}

    def delete(self, call: Call) -> Result:
        self.service.delete(call.actor, call.path["projectId"], call.path["webhookId"])
        return 204, None

    def deliveries(self, call: Call) -> Result:
        check_params(call, DELIVERY_PARAMS)
        limit = page_limit(call, default=50, maximum=500)
        found = self.service.deliveries(call.actor, call.path["projectId"], call.path["webhookId"],
                                        limit=limit + 1, before=call.query.get("before"),
                                        status=call.query.get("status"))
        more = len(found) > limit
        return 200, {"object": "list", "data": found[:limit], "has_more": more,
                     "next_cursor": found[limit - 1]["id"] if more else None}

    def test(self, call: Call) -> Result:
        delivery = self.service.send_test(call.actor, call.path["projectId"], call.path["webhookId"])
        self.wake()
        return 201, delivery

    def routes(self) -> list[tuple[str, str, Handler]]:
        one = BASE + "/{webhookId}"
        return [("POST", BASE, self.create), ("GET", BASE, self.list_webhooks), ("GET", one, self.get),
                ("PATCH", one, self.update), ("DELETE", one, self.delete),
                ("GET", one + "/deliveries", self.deliveries), ("POST", one + "/test", self.test)]
