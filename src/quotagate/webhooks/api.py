"""The webhook routes of the console API (CONTRACT §6), as (method, path, handler) for ``ConsoleAPI.routes``.

Handlers that take a body check the caller's access first (404 for a stranger, 403 for a role too low),
as the rest of the console API does; only then is the body validated."""

from __future__ import annotations

from collections.abc import Callable

from quotagate.console.api import check_params, page_limit
from quotagate.console.http import Call, Handler, Result
from quotagate.openapi import answers as a
from quotagate.openapi.spec import Param, operation
from quotagate.webhooks.schemas import WebhookCreate, WebhookUpdate
from quotagate.webhooks.service import STATUSES, WebhookService

BASE = "/v1/projects/{projectId}/webhooks"
WEBHOOKS = "Webhooks"
# The query parameters of the delivery log: ``check_params`` refuses any other, the OpenAPI document lists these.
DELIVERY_PARAMS = (
    Param("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}, "How many to return (1-500)"),
    Param("before", {"type": "string"}, "A cursor: the `next_cursor` of the previous page"),
    Param("status", {"type": "string", "enum": list(STATUSES)}, "Only the deliveries in this state"),
)


class WebhookAPI:
    def __init__(self, service: WebhookService, wake: Callable[[], None] = lambda: None) -> None:
        self.service = service
        self.wake = wake  # the local webhook loop: a test event goes out now rather than at its next poll

    @operation("Add a webhook", WEBHOOKS, status=201, body=WebhookCreate, answer=a.NewWebhook, role="owner",
               errors=(409,), description="The answer holds the signing secret: the only time it is shown. "
                                          "409 past the per-project limit.")
    def create(self, call: Call) -> Result:
        self.service.authorize(call.actor, call.path["projectId"], None, "owner")
        hook, secret = self.service.create(call.actor, call.path["projectId"], call.json(WebhookCreate))
        return 201, {**hook, "secret": secret}

    @operation("List a project's webhooks", WEBHOOKS, answer=a.WebhookList, role="member")
    def list_webhooks(self, call: Call) -> Result:
        return 200, {"object": "list", "data": self.service.list_webhooks(call.actor, call.path["projectId"])}

    @operation("Get a webhook", WEBHOOKS, answer=a.Webhook, role="member")
    def get(self, call: Call) -> Result:
        return 200, self.service.get(call.actor, call.path["projectId"], call.path["webhookId"])

    @operation("Change a webhook", WEBHOOKS, body=WebhookUpdate, answer=a.UpdatedWebhook, role="owner",
               description="Only the fields given change; `rotate_secret: true` makes a new secret, shown in "
                           "this answer only.")
    def update(self, call: Call) -> Result:
        project_id, webhook_id = call.path["projectId"], call.path["webhookId"]
        self.service.authorize(call.actor, project_id, webhook_id, "owner")
        hook, secret = self.service.update(call.actor, project_id, webhook_id, call.json(WebhookUpdate))
        return 200, hook if secret is None else {**hook, "secret": secret}

    @operation("Delete a webhook", WEBHOOKS, status=204, role="owner")
    def delete(self, call: Call) -> Result:
        self.service.delete(call.actor, call.path["projectId"], call.path["webhookId"])
        return 204, None

    @operation("A webhook's deliveries", WEBHOOKS, answer=a.DeliveryPage, role="member", params=DELIVERY_PARAMS,
               description="Newest first, in pages: each event's status, attempts and last response code.")
    def deliveries(self, call: Call) -> Result:
        check_params(call, DELIVERY_PARAMS)
        limit = page_limit(call, default=50, maximum=500)
        found = self.service.deliveries(call.actor, call.path["projectId"], call.path["webhookId"],
                                        limit=limit + 1, before=call.query.get("before"),
                                        status=call.query.get("status"))
        more = len(found) > limit
        return 200, {"object": "list", "data": found[:limit], "has_more": more,
                     "next_cursor": found[limit - 1]["id"] if more else None}

    @operation("Send a test event", WEBHOOKS, status=201, answer=a.Delivery, role="owner", errors=(409,),
               description="A `webhook.test` event, delivered like the others (409 if the webhook is disabled).")
    def test(self, call: Call) -> Result:
        delivery = self.service.send_test(call.actor, call.path["projectId"], call.path["webhookId"])
        self.wake()
        return 201, delivery

    def routes(self) -> list[tuple[str, str, Handler]]:
        one = BASE + "/{webhookId}"
        return [("POST", BASE, self.create), ("GET", BASE, self.list_webhooks), ("GET", one, self.get),
                ("PATCH", one, self.update), ("DELETE", one, self.delete),
                ("GET", one + "/deliveries", self.deliveries), ("POST", one + "/test", self.test)]
