"""The web console's Webhooks page of a project: the list, a create form (the secret shown once, handed
over like a new key's), each webhook's recent deliveries, and "Send test event". The same service and
validation as the JSON API (webhooks/)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.datastructures import FormData
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from quotagate.errors import Conflict, InvalidRequest, NotFound
from quotagate.web import forms
from quotagate.web.handover import Made
from quotagate.webhooks.schemas import EVENT_TYPES, WebhookCreate, WebhookUpdate
from quotagate.webhooks.service import WebhookService

if TYPE_CHECKING:
    from quotagate.web.views import Page, WebConsole

DELIVERIES_SHOWN = 10
ACTIONS = {"test", "enable", "disable", "rotate", "delete"}


def thresholds(raw: str) -> list[Any]:
    """"50, 80, 100" (percent) as the API's fractions; what is not a number stays text for the API to refuse."""
    out: list[Any] = []
    for part in raw.replace("%", " ").replace(",", " ").split():
        try:
            out.append(round(float(part) / 100, 6))
        except ValueError:
            out.append(part)
    return out


class WebhookPages:
    def __init__(self, console: WebConsole, service: WebhookService) -> None:
        self.console = console
        self.service = service

    async def _page(self, page: Page, project_id: str, status: int = 200, **extra: Any) -> Response:
        c = self.console
        assert page.actor is not None
        project = await c.call(c.accounts.get_project, page.actor, project_id)
        if project.role == "viewer":
            raise NotFound("webhooks are shown to the project's members and owners")
        hooks = await c.call(self.service.list_webhooks, page.actor, project_id)
        for hook in hooks:
            hook["deliveries"] = await c.call(self.service.deliveries, page.actor, project_id, hook["id"],
                                              limit=DELIVERIES_SHOWN, before=None, status=None)
        return c.render(page, "webhooks.html", status, project=project, picker=await c.picker(page, project),
                        hooks=hooks, event_types=EVENT_TYPES, can_write=project.role == "owner", **extra)

    async def list_page(self, page: Page) -> Response:
        project_id = page.request.path_params["projectId"]
        return await self._page(page, project_id, made=self.console._made(page))

    async def create(self, page: Page, form: FormData) -> Response:
        assert page.actor is not None
        project_id = page.request.path_params["projectId"]
        data: dict[str, Any] = {"url": str(form.get("url", "")).strip(),
                                "events": [str(e) for e in form.getlist("events")]}
        if str(form.get("budget_thresholds", "")).strip():  # blank: the API's default
            data["budget_thresholds"] = thresholds(str(form.get("budget_thresholds", "")))
        body, errors = forms.validate(WebhookCreate, data)
        status = 400
        if body is not None:
            try:
                hook, secret = await self.console.call(self.service.create, page.actor, project_id, body)
            except (InvalidRequest, Conflict) as exc:
                errors, status = forms.field_error(exc), exc.status
            else:
                made = Made(hook["url"], hook["secret_prefix"], secret, "Your webhook's secret")
                return self.console._hand_over(page, f"/projects/{project_id}/webhooks", made)
        values = {"url": data["url"], "events": data["events"],
                  "budget_thresholds": str(form.get("budget_thresholds", ""))}
        return await self._page(page, project_id, status, values=values, errors=errors)

    async def action(self, page: Page, form: FormData) -> Response:
        assert page.actor is not None
        c = self.console
        project_id, webhook_id = page.request.path_params["projectId"], page.request.path_params["webhookId"]
        action = page.request.path_params["action"]
        if action not in ACTIONS:
            raise NotFound("no such action")
        back = f"/projects/{project_id}/webhooks"
        if action == "test":
            await c.call(self.service.send_test, page.actor, project_id, webhook_id)
            if c.wake_webhooks is not None:
                c.wake_webhooks()
        elif action == "delete":
            await c.call(self.service.delete, page.actor, project_id, webhook_id)
        else:
            change = {"rotate_secret": True} if action == "rotate" else {"enabled": action == "enable"}
            hook, secret = await c.call(self.service.update, page.actor, project_id, webhook_id,
                                        WebhookUpdate.model_validate(change))
            if secret is not None:
                return c._hand_over(page, back, Made(hook["url"], hook["secret_prefix"], secret,
                                                     "Your webhook's new secret"))
        return RedirectResponse(f"{back}#{webhook_id}", status_code=303)

    def routes(self) -> list[BaseRoute]:
        page = self.console.page
        return [
            Route("/projects/{projectId}/webhooks", page()(self.list_page), methods=["GET"]),
            Route("/projects/{projectId}/webhooks", page(write=True)(self.create), methods=["POST"]),
            Route("/projects/{projectId}/webhooks/{webhookId}/{action}", page(write=True)(self.action),
                  methods=["POST"]),
        ]
