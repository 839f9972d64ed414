"""The web console's pages. Each handler turns a form into the same validated input the JSON API uses,
calls the same service, and renders the result or the service's error next to the field it names."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from quotagate.accounts.models import Actor, Project
from quotagate.accounts.service import AccountService
from quotagate.accounts.signin import GateFull, HashGate, SignInThrottle
from quotagate.console.http import error_response, read_body
from quotagate.errors import Conflict, InvalidRequest, NotFound, QuotagateError, Unauthenticated
from quotagate.ids import utcnow
from quotagate.keys.models import PERIODS, InferenceKey
from quotagate.keys.schemas import KeyCreate, KeyUpdate, RotateRequest, metadata_filter
from quotagate.keys.service import KeyService
from quotagate.metering.export import ACTIVITY_COLUMNS, USAGE_COLUMNS, csv_lines, csv_response
from quotagate.web import charts, forms
from quotagate.web import usage as usage_view
from quotagate.web.handover import Handover, Made
from quotagate.web.session import COOKIE, SESSION_TOKEN_NAME, csrf_ok, csrf_token
from quotagate.web.webhooks import WebhookPages
from quotagate.webhooks.service import WebhookService

if TYPE_CHECKING:
    from quotagate.metering.pages import ProjectUsagePages

HERE = Path(__file__).parent
UsageQuery = Callable[[Actor, str, datetime, datetime, str], dict[str, Any]]


def limits_text(key: InferenceKey | Project) -> list[str]:
    """Limits in human form: "600 rpm", "200k tpm", "5M tokens / month"."""
    out = []
    if key.rpm:
        out.append(f"{charts.human(key.rpm)} rpm")
    if key.tpm:
        out.append(f"{charts.human(key.tpm)} tpm")
    if key.token_limit:
        out.append(f"{charts.human(key.token_limit)} tokens / {key.token_limit_period}")
    return out or ["unlimited"]


def duration_text(span: timedelta) -> str:
    """14 days → "14 days", 24 hours → "24 hours", 90 s → "90 seconds"."""
    seconds = int(span.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0 and not (unit == "day" and seconds < 2 * 86400):
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


# Keys shown per page of the web console's key list.
KEYS_PER_PAGE = 100
# Projects per page of /projects, and in the top bar's picker (which also offers "All projects…").
PROJECTS_PER_PAGE = 100
PICKER_SIZE = 50
# The sign-in form is an email, a password (at most 1024 characters) and a path to go back to.
LOGIN_MAX_BODY_BYTES = 16 * 1024

class Page:
    """One request's context: the signed-in actor (if any), the session secret and the CSRF token."""

    def __init__(self, request: Request, actor: Actor | None, secret: str | None) -> None:
        self.request = request
        self.actor = actor
        self.secret = secret
        self.csrf = csrf_token(secret) if secret else ""


class WebConsole:
    def __init__(self, accounts: AccountService, keys: KeyService, catalog: Callable[[], frozenset[str]],
                 usage: UsageQuery | None = None, throttle: SignInThrottle | None = None,
                 gate: HashGate | None = None, origin: str | None = None,
                 project_usage: ProjectUsagePages | None = None,
                 webhooks: WebhookService | None = None, wake_webhooks: Callable[[], None] | None = None) -> None:
        """``origin``: the console's public origin, which sign-in posts must come from; None: the origin
        each request was addressed to (its scheme and Host header)."""
        self.accounts = accounts
        self.keys = keys
        self._catalog = catalog
        self.usage = usage
        self.project_usage = project_usage
        self.throttle = throttle or SignInThrottle()
        self.gate = gate or HashGate()
        self.origin = origin
        self.webhooks = webhooks
        self.wake_webhooks = wake_webhooks  # the local webhook loop: a test event goes out at once
        self.handover = Handover()
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.globals.update(human=charts.human, limits_text=limits_text, periods=PERIODS,
                                          networks_text=forms.networks_text, metadata_text=forms.metadata_text,
                                          model_limits_text=forms.model_limits_text)

    # -- plumbing ----------------------------------------------------------------------------
    async def _page(self, request: Request) -> Page:
        secret = request.cookies.get(COOKIE)
        if not secret:
            return Page(request, None, None)
        try:
            user, token_id = await run_in_threadpool(self.accounts.authenticate_session, secret)
        except Unauthenticated:
            return Page(request, None, None)
        ip = request.client.host if request.client else None
        actor = Actor(user=user, client_ip=ip, user_agent=request.headers.get("user-agent"), token_id=token_id)
        return Page(request, actor, secret)

    def render(self, page: Page, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        # No headers here: the console's security headers go on every answer (console/headers.py).
        return self.templates.TemplateResponse(
            page.request, template, {"actor": page.actor, "csrf": page.csrf, **context}, status_code=status)

    def page(self, *, write: bool = False) -> Callable[[Callable[..., Awaitable[Response]]],
                                                     Callable[[Request], Awaitable[Response]]]:
        """Decorate a handler: require a signed-in user (else redirect to sign in), check the CSRF token
        of a write, and render a service error as an error page."""

        def wrap(handler: Callable[..., Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
            async def run(request: Request) -> Response:
                page = await self._page(request)
                if page.actor is None or page.secret is None:
                    if request.method == "GET":
                        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
                    return RedirectResponse("/login", status_code=303)
                form: FormData | None = None
                if write:
                    form = await request.form(max_files=0, max_fields=200)
                    presented = form.get("csrf")
                    if not csrf_ok(page.secret, presented if isinstance(presented, str) else None):
                        return self.render(page, "error.html", 403, title="Form expired",
                                           message="This form is stale or came from another site. "
                                                   "Reload the page and try again.")
                try:
                    return await handler(page, form) if write else await handler(page)
                except NotFound as exc:
                    return self.render(page, "error.html", 404, title="Not found", message=exc.message)
                except QuotagateError as exc:
                    return self.render(page, "error.html", exc.status, title="Not allowed", message=exc.message)
            return run
        return wrap

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await run_in_threadpool(fn, *args, **kwargs)

    # -- sign in and out -----------------------------------------------------------------------
    async def login_form(self, request: Request) -> Response:
        page = await self._page(request)
        if page.actor is not None:
            return RedirectResponse("/", status_code=303)
        return self.render(page, "login.html", next=request.query_params.get("next", "/"))

    def _from_our_page(self, request: Request) -> bool:
        """Whether a sign-in post comes from the console's own page (login CSRF: another site's form must
        not sign a browser in as the attacker). Browsers send Origin (and Sec-Fetch-Site) with every
        form POST; a client that sends neither is no browser, and cannot be forged into one."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site != "same-origin":
            return False
        origin = request.headers.get("origin")
        if origin is None:
            return True
        expected = self.origin or f"{request.url.scheme}://{request.headers.get('host', '')}"
        return origin.lower() == expected.lower()

    async def login(self, request: Request) -> Response:
        page = Page(request, None, None)
        try:
            body = await read_body(request, LOGIN_MAX_BODY_BYTES)
        except QuotagateError as exc:  # too large, stalled or broken: answered as the other forms' bodies are
            return error_response(exc)
        form = dict(parse_qsl(body.decode("utf-8", "replace"), max_num_fields=10))
        email = form.get("email", "").strip().lower()
        password = form.get("password", "")
        nxt = form.get("next", "/")
        nxt = nxt if nxt.startswith("/") and not nxt.startswith("//") else "/"
        if not self._from_our_page(request):
            return self.render(page, "login.html", 403, email=email, next=nxt,
                               error="Sign-in from another site was refused. Sign in on this page.")
        ip = request.client.host if request.client else None
        # Recorded before the password is checked, in one step with the check of the count: simultaneous
        # attempts cannot all get through (they all used to be checked).
        wait = self.throttle.admit(email, ip)
        if wait > 0:
            seconds = math.ceil(wait)
            response = self.render(page, "login.html", 429, email=email, next=nxt,
                                   error=f"Too many failed attempts. Try again in {seconds} seconds.")
            response.headers["Retry-After"] = str(seconds)
            return response
        try:
            user = await self.gate.run(self.accounts.authenticate_password, email, password)
        except GateFull:
            self.throttle.refund(email, ip)
            response = self.render(page, "login.html", 503, email=email, next=nxt,
                                   error="Too many sign-ins at this moment. Try again in a second.")
            response.headers["Retry-After"] = "1"
            return response
        except (Unauthenticated, InvalidRequest):
            return self.render(page, "login.html", 401, email=email, next=nxt, error="Wrong email or password.")
        self.throttle.succeeded(email, ip)
        _token, secret = await self.call(self.accounts.create_token, user, SESSION_TOKEN_NAME, kind="session")
        signed_in = RedirectResponse(nxt, status_code=303)
        signed_in.set_cookie(COOKIE, secret, httponly=True, samesite="lax", secure=request.url.scheme == "https",
                             max_age=int(self.accounts.sessions.max_age.total_seconds()), path="/")
        return signed_in

    async def logout(self, request: Request) -> Response:
        page = await self._page(request)
        form = await request.form(max_files=0, max_fields=10)
        response = RedirectResponse("/login", status_code=303)
        if page.actor is not None and page.secret and csrf_ok(page.secret, str(form.get("csrf", ""))):
            await self.call(self.accounts.revoke_token, page.actor.user, page.actor.token_id)
            response.delete_cookie(COOKIE, path="/")
        return response

    # -- projects ------------------------------------------------------------------------------
    async def home(self, page: Page) -> Response:
        assert page.actor is not None
        projects = await self.call(self.accounts.list_projects, page.actor, limit=1)
        if projects and not await self.call(self.accounts.list_invitations, page.actor.user):
            return RedirectResponse(f"/projects/{projects[0].id}/keys", status_code=303)
        return RedirectResponse("/projects", status_code=303)

    async def projects(self, page: Page, status: int = 200, **extra: Any) -> Response:
        """One page of the user's projects, newest first, and the form to create one."""
        assert page.actor is not None
        before = page.request.query_params.get("before") or None
        try:
            found = await self.call(self.accounts.list_projects, page.actor, limit=PROJECTS_PER_PAGE + 1,
                                    before=before)
        except InvalidRequest as exc:
            return self.render(page, "error.html", 400, title="No such page", message=exc.message)
        older = found[PROJECTS_PER_PAGE - 1].id if len(found) > PROJECTS_PER_PAGE else None
        found = found[:PROJECTS_PER_PAGE]
        invitations = await self.call(self.accounts.list_invitations, page.actor.user)
        return self.render(page, "projects.html", status, projects=found, picker=found[:PICKER_SIZE],
                           project=None, older=older, paged=before is not None, invitations=invitations, **extra)

    async def invitation(self, page: Page, form: FormData) -> Response:
        """Accept (then open the project) or decline an invitation."""
        assert page.actor is not None
        project_id, action = page.request.path_params["projectId"], page.request.path_params["action"]
        if action == "accept":
            await self.call(self.accounts.accept_invitation, page.actor, project_id)
            return RedirectResponse(f"/projects/{project_id}/keys", status_code=303)
        if action == "decline":
            await self.call(self.accounts.decline_invitation, page.actor, project_id)
            return RedirectResponse("/projects", status_code=303)
        return self.render(page, "error.html", 404, title="Not found", message="no such action")

    async def picker(self, page: Page, current: Project | None = None) -> list[Project]:
        """The projects in the top bar's picker: the newest few (one query), and the current one."""
        assert page.actor is not None
        shown: list[Project] = await self.call(self.accounts.list_projects, page.actor, limit=PICKER_SIZE)
        if current is not None and all(p.id != current.id for p in shown):
            shown.append(current)
        return shown

    async def go_to_project(self, page: Page) -> Response:
        """The project picker without JavaScript: a GET form whose value is the page to open."""
        target = page.request.query_params.get("project", "/projects")
        return RedirectResponse(target if target.startswith("/projects") else "/projects", status_code=303)

    async def create_project(self, page: Page, form: FormData) -> Response:
        from quotagate.accounts.schemas import ProjectCreate

        assert page.actor is not None
        name = str(form.get("name", ""))
        body, errors = forms.validate(ProjectCreate, {"name": name})
        status = 400
        if body is not None:
            try:
                project = await self.call(self.accounts.create_project, page.actor, body)
            except (InvalidRequest, Conflict) as exc:
                errors, status = forms.field_error(exc), exc.status
            else:
                return RedirectResponse(f"/projects/{project.id}/keys", status_code=303)
        return await self.projects(page, status, values={"name": name}, errors=errors)

    # -- keys ----------------------------------------------------------------------------------
    async def _keys_page(self, page: Page, project_id: str, status: int = 200, **extra: Any) -> Response:
        assert page.actor is not None
        project: Project = await self.call(self.accounts.get_project, page.actor, project_id)
        show_archived = page.request.query_params.get("archived") in ("1", "true", "on")
        before = page.request.query_params.get("before") or None
        # One page at a time, newest first (a project can hold thousands of keys); one extra row tells
        # whether there is an older page.
        keys = await self.call(self.keys.list_keys, page.actor, project_id, include_archived=show_archived,
                               limit=KEYS_PER_PAGE + 1, before=before)
        older = keys[KEYS_PER_PAGE - 1].id if len(keys) > KEYS_PER_PAGE else None
        keys = keys[:KEYS_PER_PAGE]
        models = sorted(project.models) if project.models is not None else sorted(self._catalog())
        return self.render(page, "keys.html", status, project=project, picker=await self.picker(page, project),
                           keys=keys,
                           show_archived=show_archived, models=models, now=utcnow(), older=older,
                           paged=before is not None,
                           can_write=project.role != "viewer", **extra)

    async def project_limits(self, page: Page, form: FormData) -> Response:
        """An owner sets the project's own limits (shared by all its keys), as ``PATCH /v1/projects/{id}``
        does: every field's problem at once, the input kept; the service refuses anyone else."""
        from quotagate.accounts.schemas import ProjectUpdate

        assert page.actor is not None
        project_id = page.request.path_params["projectId"]
        data = forms.project_limit_fields(form)
        body, errors = forms.validate(ProjectUpdate, data)
        errors = forms.budget_pair_error(data, errors)
        status = 400
        if body is not None and not errors:
            try:
                await self.call(self.accounts.update_project, page.actor, project_id, body)
            except InvalidRequest as exc:
                errors, status = forms.field_error(exc), exc.status
            else:
                return RedirectResponse(f"/projects/{project_id}/keys#project-limits", status_code=303)
        return await self._keys_page(page, project_id, status, limit_values=forms.typed(form), limit_errors=errors)

    def _hand_over(self, page: Page, path: str, made: Made) -> RedirectResponse:
        """Post/Redirect/Get for a form that made a secret: the secret waits for this session's GET of
        ``path`` (reloading that page then shows the page, and makes and shows nothing again)."""
        assert page.actor is not None and page.actor.token_id is not None
        self.handover.put(page.actor.token_id, path, made)
        return RedirectResponse(path, status_code=303)

    def _made(self, page: Page) -> Made | None:
        """The secret a form just made for this page, if any: taken, so it is shown this once."""
        assert page.actor is not None and page.actor.token_id is not None
        return self.handover.take(page.actor.token_id, page.request.url.path)

    async def keys_list(self, page: Page) -> Response:
        return await self._keys_page(page, page.request.path_params["projectId"], made=self._made(page))

    async def create_key(self, page: Page, form: FormData) -> Response:
        assert page.actor is not None
        project_id = page.request.path_params["projectId"]
        data = forms.key_fields(form, partial=False)
        own = forms.restrictions(form, data, current=None)
        per_model, lines = forms.model_limits(form, data, current=None)
        body, errors = forms.validate(KeyCreate, data, lines)
        errors = forms.budget_pair_error(data, {**errors, **own, **per_model})
        status = 400
        if body is not None and not errors:
            try:
                key, secret = await self.call(self.keys.mint, page.actor, project_id, body)
            except (InvalidRequest, Conflict) as exc:
                errors, status = forms.field_error(exc), exc.status
            else:
                return self._hand_over(page, f"/projects/{project_id}/keys",
                                       Made(key.name, key.prefix, secret, "Your new key"))
        return await self._keys_page(page, project_id, status, values=forms.typed(form), errors=errors)

    async def key_detail(self, page: Page) -> Response:
        return await self._key_page(page, page.request.path_params["keyId"], made=self._made(page))

    async def _key_page(self, page: Page, key_id: str, status: int = 200, **extra: Any) -> Response:
        assert page.actor is not None
        key: InferenceKey = await self.call(self.keys.get, page.actor, key_id)
        project: Project = await self.call(self.accounts.get_project, page.actor, key.project_id)
        rng = page.request.query_params.get("range", "day")
        span = usage_view.parse_span({"range": rng if rng in usage_view.RANGES else "day"}, utcnow())
        data = activity = None
        charts_svg: dict[str, str] = {}
        table: list[tuple[str, dict[str, Any]]] = []
        if self.usage is not None:
            data = await self.call(self.usage, page.actor, key_id, span.start, span.end, span.granularity)
            charts_svg, table = usage_view.series_charts(span, data.get("series", []))
            budget = (data.get("limits") or {}).get("budget")
            if budget:
                charts_svg["budget"] = charts.meter_bar(budget["used"], budget["limit"],
                                                        label=f"Budget used this {budget['period']}")
            activity = data.get("activity", [])
        models = sorted(project.models) if project.models is not None else sorted(self._catalog())
        return self.render(page, "key.html", status, key=key, project=project, picker=await self.picker(page, project),
                           now=utcnow(),
                           can_write=project.role != "viewer", usage=data, activity=activity, charts=charts_svg,
                           table=table, range=span.name, granularity=span.granularity, models=models, **extra)

    async def key_action(self, page: Page, form: FormData) -> Response:
        assert page.actor is not None
        key_id, action = page.request.path_params["keyId"], page.request.path_params["action"]
        if action == "revoke":
            await self.call(self.keys.revoke, page.actor, key_id)
        elif action in ("archive", "unarchive"):
            await self.call(self.keys.set_archived, page.actor, key_id, action == "archive")
        elif action == "edit":
            data = forms.key_fields(form, partial=True)
            current = await self.call(self.keys.get, page.actor, key_id)
            own = forms.restrictions(form, data, current=current)
            per_model, lines = forms.model_limits(form, data, current=current)
            body, errors = forms.validate(KeyUpdate, data, lines)
            errors = {**errors, **own, **per_model}
            if body is not None and not errors:
                try:
                    await self.call(self.keys.update, page.actor, key_id, body)
                except InvalidRequest as exc:
                    errors = forms.field_error(exc)
            if errors:
                return await self._key_page(page, key_id, 400, values=forms.typed(form), errors=errors)
        elif action == "rotate":
            rotation, errors = forms.validate(RotateRequest, {
                "grace_period_seconds": forms.number(str(form.get("grace_period_seconds", "0")) or "0")})
            if rotation is None:
                return await self._key_page(page, key_id, 400, errors=errors)
            new, secret, _old = await self.call(self.keys.rotate, page.actor, key_id, rotation)
            return self._hand_over(page, f"/keys/{new.id}",
                                   Made(new.name, new.prefix, secret, "Rotated: the new key"))
        else:
            raise NotFound("no such action")
        nxt = str(form.get("next", ""))
        safe = nxt.startswith("/") and not nxt.startswith("//")
        return RedirectResponse(nxt if safe else f"/keys/{key_id}", status_code=303)

    # -- project usage -------------------------------------------------------------------------
    def _usage_query(self, page: Page) -> tuple[usage_view.Span, dict[str, str], dict[str, str]]:
        """The usage page's range and metadata filter from its query, and their problems by field."""
        params = page.request.query_params
        span = usage_view.parse_span(params, utcnow())
        errors = dict(span.errors)
        metadata: dict[str, str] = {}
        for entry in (m for m in params.getlist("metadata") if m.strip()):
            # One at a time: a wrong entry is flagged and the filters before it are kept (their chips and
            # hidden fields), so fixing it does not lose them.
            try:
                metadata = metadata_filter([*(f"{k}={v}" for k, v in metadata.items()), entry])
            except InvalidRequest as exc:
                errors["metadata"] = forms.wording(exc.message, "metadata")
        return span, metadata, errors

    async def project_usage_page(self, page: Page) -> Response:
        """The project's usage in a range, all keys or those with some metadata: totals, the charts, by key,
        by model, and links to the range's usage and activity as CSV."""
        assert page.actor is not None
        project_id = page.request.path_params["projectId"]
        project: Project = await self.call(self.accounts.get_project, page.actor, project_id)
        span, metadata, errors = self._usage_query(page)
        path = f"/projects/{project.id}/usage"
        found: dict[str, Any] | None = None
        drawn: dict[str, str] = {}
        table: list[tuple[str, dict[str, Any]]] = []
        limits: dict[str, Any] | None = None
        if self.project_usage is not None and not errors:
            found = await self.call(self.project_usage.usage, page.actor, project.id, span.start, span.end,
                                    span.granularity, metadata)
            drawn, table = usage_view.series_charts(span, usage_view.summed_over_models(found["data"]))
            # The project's limits now (whatever the range): the same live state as the usage API's.
            limits = await self.call(self.project_usage.limits, page.actor, project.id)
            budget = (limits or {}).get("budget")
            if budget and budget.get("used") is not None:
                drawn["project_budget"] = charts.meter_bar(budget["used"], budget["limit"],
                                                           label=f"Project budget used this {budget['period']}")
        ranged = {name: usage_view.link(path, {"range": name}, metadata) for name in usage_view.RANGES}
        without = {k: usage_view.link(path, span.query(), {m: v for m, v in metadata.items() if m != k})
                   for k in metadata}
        return self.render(page, "usage.html", 400 if errors else 200, project=project,
                           picker=await self.picker(page, project), span=span, metadata=metadata, errors=errors,
                           usage=found, charts=drawn, table=table, ranged=ranged, without=without, limits=limits,
                           available=self.project_usage is not None,
                           tag_link=lambda k, v: usage_view.link(path, span.query(), {**metadata, k: v}),
                           usage_csv=usage_view.link(f"/projects/{project.id}/usage.csv", span.query(), metadata),
                           activity_csv=usage_view.link(f"/projects/{project.id}/activity.csv", span.query(),
                                                        metadata))

    async def project_export(self, page: Page) -> Response:
        """``usage.csv`` (a row per bucket and model) or ``activity.csv`` (a row per request, every one of
        the range, streamed) of the range and filter the usage page shows: the API's CSV columns."""
        assert page.actor is not None
        project_id, what = page.request.path_params["projectId"], page.request.path_params["what"]
        project: Project = await self.call(self.accounts.get_project, page.actor, project_id)
        span, metadata, errors = self._usage_query(page)
        if errors or self.project_usage is None:
            message = "; ".join(errors.values()) if errors else "Usage is not available on this instance."
            return self.render(page, "error.html", 400 if errors else 404, title="No export", message=message)
        stamp = f"{span.start:%Y%m%d}-{span.end:%Y%m%d}"
        if what == "usage":
            found = await self.call(self.project_usage.usage, page.actor, project.id, span.start, span.end,
                                    span.granularity, metadata)
            return csv_response(found["data"], USAGE_COLUMNS, f"usage-{project.id}-{stamp}.csv")
        if what == "activity":
            pages = self.project_usage.activity(page.actor, project.id, span.start, span.end, metadata)
            # A sync iterator: Starlette reads it in its thread pool, a page of rows at a time.
            return StreamingResponse(csv_lines(pages, ACTIVITY_COLUMNS), media_type="text/csv; charset=utf-8",
                                     headers={"Content-Disposition":
                                              f'attachment; filename="activity-{project.id}-{stamp}.csv"'})
        raise NotFound("no such export")

    # -- access tokens -------------------------------------------------------------------------
    async def tokens(self, page: Page) -> Response:
        return await self._tokens_page(page, made=self._made(page))

    async def _tokens_page(self, page: Page, status: int = 200, **extra: Any) -> Response:
        """API tokens in a table; the browsers signed in (web sessions) apart, only those still live: one
        sign-in after another would otherwise pile up rows of ended "web session"s among the tokens."""
        assert page.actor is not None
        tokens = await self.call(self.accounts.list_tokens, page.actor.user)
        api_tokens = [t for t in tokens if t.kind != "session"]
        sessions = [t for t in tokens if t.kind == "session"]
        live = [t for t in sessions if t.status == "active"]
        policy = self.accounts.sessions
        return self.render(page, "tokens.html", status, api_tokens=api_tokens, sessions=live,
                           ended=len(sessions) - len(live), idle_text=duration_text(policy.idle),
                           max_age_text=duration_text(policy.max_age), picker=await self.picker(page),
                           project=None, current_token=page.actor.token_id, **extra)

    async def token_action(self, page: Page, form: FormData) -> Response:
        from quotagate.accounts.schemas import TokenCreate

        assert page.actor is not None
        if page.request.path_params.get("tokenId"):
            await self.call(self.accounts.revoke_token, page.actor.user, page.request.path_params["tokenId"])
            return RedirectResponse("/tokens", status_code=303)
        name = str(form.get("name", ""))
        body, errors = forms.validate(TokenCreate, {"name": name if name.strip() else "console"})
        if body is None:
            return await self._tokens_page(page, 400, values={"name": name}, errors=errors)
        token, secret = await self.call(self.accounts.create_token, page.actor.user, body.name)
        return self._hand_over(page, "/tokens", Made(token.name, token.prefix, secret, "Your new access token"))

    async def favicon(self, _request: Request) -> Response:
        """Browsers ask for /favicon.ico on every page whatever the page says; a small icon, cached for a
        day, rather than a 404 in every log."""
        return FileResponse(HERE / "static" / "favicon.ico", media_type="image/x-icon",
                            headers={"Cache-Control": "public, max-age=86400"})

    # -- routing -------------------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.page()(self.home)),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/projects", self.page()(self.projects), methods=["GET"]),
            Route("/projects/go", self.page()(self.go_to_project), methods=["GET"]),
            Route("/projects", self.page(write=True)(self.create_project), methods=["POST"]),
            Route("/invitations/{projectId}/{action}", self.page(write=True)(self.invitation), methods=["POST"]),
            Route("/projects/{projectId}/keys", self.page()(self.keys_list), methods=["GET"]),
            Route("/projects/{projectId}/keys", self.page(write=True)(self.create_key), methods=["POST"]),
            Route("/projects/{projectId}/limits", self.page(write=True)(self.project_limits), methods=["POST"]),
            Route("/projects/{projectId}/usage", self.page()(self.project_usage_page), methods=["GET"]),
            Route("/projects/{projectId}/{what}.csv", self.page()(self.project_export), methods=["GET"]),
            Route("/keys/{keyId}", self.page()(self.key_detail), methods=["GET"]),
            Route("/keys/{keyId}/{action}", self.page(write=True)(self.key_action), methods=["POST"]),
            Route("/tokens", self.page()(self.tokens), methods=["GET"]),
            Route("/tokens", self.page(write=True)(self.token_action), methods=["POST"]),
            Route("/tokens/{tokenId}/revoke", self.page(write=True)(self.token_action), methods=["POST"]),
            Route("/favicon.ico", self.favicon, methods=["GET", "HEAD"]),
            *(WebhookPages(self, self.webhooks).routes() if self.webhooks is not None else []),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ]
