"""The console API's routes (CONTRACT §3): projects, members, access tokens, keys, audit log."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from quotagate.accounts.models import Actor
from quotagate.accounts.schemas import MemberAdd, MemberUpdate, ProjectCreate, ProjectUpdate, TokenCreate
from quotagate.accounts.service import AccountService
from quotagate.audit import AuditLog
from quotagate.console.http import (
    JSON,
    Call,
    Handler,
    Result,
    bearer_token,
    client_ip,
    endpoint,
    error_response,
    read_body,
)
from quotagate.errors import InvalidRequest, QuotagateError
from quotagate.ids import utcnow
from quotagate.keys.leaks import ReportThrottle, answer, is_ours, parse_report
from quotagate.keys.schemas import KeyCreate, KeyUpdate, RotateRequest
from quotagate.keys.service import KeyService


def page_limit(call: Call, default: int = 100, maximum: int = 1000) -> int:
    raw = call.query.get("limit")
    if raw is None:
        return default
    # isascii: str.isdigit() is also true of digits int() refuses, such as "²".
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:
        raise InvalidRequest(f"limit: must be a whole number from 1 to {maximum}, not {raw!r}", field="limit")
    return int(raw)


def check_params(call: Call, allowed: frozenset[str]) -> None:
    """400 for a query parameter the endpoint does not know (a misspelt cursor would page forever)."""
    unknown = sorted(set(call.query.keys()) - allowed)
    if unknown:
        raise InvalidRequest(f"{unknown[0]}: unknown query parameter; expected one of {', '.join(sorted(allowed))}",
                             field=unknown[0])


LEAK_REPORT_MAX_BYTES = 1024 * 1024  # a report of MAX_TOKENS tokens with their URLs
KEY_LIST_PARAMS = frozenset({"include_archived", "limit", "before", "starting_after"})
PROJECT_LIST_PARAMS = frozenset({"limit", "before", "starting_after"})


class ConsoleAPI:
    """Handlers over the services; each returns (status, JSON payload).

    Handlers that take a body check the caller's access first, so that a stranger hears 404 and a
    viewer 403 whatever the body holds; only then is the body validated (400)."""

    def __init__(self, accounts: AccountService, keys: KeyService, audit: AuditLog,
                 leak_reports: ReportThrottle | None = None) -> None:
        self.accounts = accounts
        self.keys = keys
        self.audit = audit
        self.leak_reports = leak_reports or ReportThrottle(30)

    async def authenticate(self, request: Request) -> Actor:
        token = bearer_token(request)
        user, token_id = await run_in_threadpool(self.accounts.authenticate_token, token)
        return Actor(user=user, client_ip=client_ip(request), user_agent=request.headers.get("user-agent"),
                     token_id=token_id)

    # -- me and access tokens ------------------------------------------------------------------
    def me(self, call: Call) -> Result:
        return 200, call.actor.user.to_json()

    def list_tokens(self, call: Call) -> Result:
        tokens = self.accounts.list_tokens(call.actor.user)
        return 200, {"object": "list", "data": [t.to_json() for t in tokens]}

    def create_token(self, call: Call) -> Result:
        body = call.json(TokenCreate)
        token, secret = self.accounts.create_token(call.actor.user, body.name)
        return 201, {**token.to_json(), "token": secret}

    def revoke_token(self, call: Call) -> Result:
        return 200, self.accounts.revoke_token(call.actor.user, call.path["tokenId"]).to_json()

    # -- invitations (the invited user's side) -------------------------------------------------
    def list_invitations(self, call: Call) -> Result:
        found = self.accounts.list_invitations(call.actor.user)
        return 200, {"object": "list", "data": [i.to_json() for i in found]}

    def accept_invitation(self, call: Call) -> Result:
        return 200, self.accounts.accept_invitation(call.actor, call.path["projectId"]).to_json()

    def decline_invitation(self, call: Call) -> Result:
        self.accounts.decline_invitation(call.actor, call.path["projectId"])
        return 204, None

    # -- projects and members ----------------------------------------------------------------
    def create_project(self, call: Call) -> Result:
        return 201, self.accounts.create_project(call.actor, call.json(ProjectCreate)).to_json()

    def list_projects(self, call: Call) -> Result:
        check_params(call, PROJECT_LIST_PARAMS)
        limit = page_limit(call)
        before = call.query.get("before") or call.query.get("starting_after")
        found = self.accounts.list_projects(call.actor, limit=limit + 1, before=before)
        more = len(found) > limit
        return 200, {"object": "list", "data": [p.to_json() for p in found[:limit]], "has_more": more,
                     "next_cursor": found[limit - 1].id if more else None}

    def get_project(self, call: Call) -> Result:
        return 200, self.accounts.get_project(call.actor, call.path["projectId"]).to_json()

    def update_project(self, call: Call) -> Result:
        self.accounts.authorize(call.actor, call.path["projectId"], "owner")
        body = call.json(ProjectUpdate)
        return 200, self.accounts.update_project(call.actor, call.path["projectId"], body).to_json()

    def list_members(self, call: Call) -> Result:
        members = self.accounts.list_members(call.actor, call.path["projectId"])
        return 200, {"object": "list", "data": [m.to_json() for m in members]}

    def add_member(self, call: Call) -> Result:
        self.accounts.authorize(call.actor, call.path["projectId"], "owner")
        body = call.json(MemberAdd)
        return 201, self.accounts.add_member(call.actor, call.path["projectId"], body).to_json()

    def change_member(self, call: Call) -> Result:
        self.accounts.authorize(call.actor, call.path["projectId"], "owner")
        body = call.json(MemberUpdate)
        member = self.accounts.change_member(call.actor, call.path["projectId"], call.path["userId"], body)
        return 200, member.to_json()

    def remove_member(self, call: Call) -> Result:
        self.accounts.remove_member(call.actor, call.path["projectId"], call.path["userId"])
        return 204, None

    def audit_log(self, call: Call) -> Result:
        project_id = call.path["projectId"]
        self.accounts.get_project(call.actor, project_id)  # 404 unless the caller may read it
        events = self.audit.list(project_id, limit=page_limit(call), before=call.query.get("before"))
        return 200, {"object": "list", "data": events}

    # -- inference keys ----------------------------------------------------------------------
    def mint_key(self, call: Call) -> Result:
        self.accounts.authorize(call.actor, call.path["projectId"], "member")
        key, secret = self.keys.mint(call.actor, call.path["projectId"], call.json(KeyCreate))
        return 201, {**key.to_json(utcnow()), "secret": secret}

    def list_keys(self, call: Call) -> Result:
        self.accounts.authorize(call.actor, call.path["projectId"], "viewer")
        check_params(call, KEY_LIST_PARAMS)
        archived = call.flag("include_archived")
        limit = page_limit(call)
        before = call.query.get("before") or call.query.get("starting_after")  # OpenAI's name for it
        found = self.keys.list_keys(call.actor, call.path["projectId"], include_archived=archived,
                                    limit=limit + 1, before=before)
        more = len(found) > limit
        now = utcnow()
        return 200, {"object": "list", "data": [k.to_json(now) for k in found[:limit]], "has_more": more,
                     "next_cursor": found[limit - 1].id if more else None}

    def get_key(self, call: Call) -> Result:
        return 200, self.keys.get(call.actor, call.path["keyId"]).to_json(utcnow())

    def update_key(self, call: Call) -> Result:
        self.keys.authorize(call.actor, call.path["keyId"], "member")
        return 200, self.keys.update(call.actor, call.path["keyId"], call.json(KeyUpdate)).to_json(utcnow())

    def revoke_key(self, call: Call) -> Result:
        return 200, self.keys.revoke(call.actor, call.path["keyId"]).to_json(utcnow())

    def archive_key(self, call: Call) -> Result:
        return 200, self.keys.set_archived(call.actor, call.path["keyId"], True).to_json(utcnow())

    def unarchive_key(self, call: Call) -> Result:
        return 200, self.keys.set_archived(call.actor, call.path["keyId"], False).to_json(utcnow())

    def rotate_key(self, call: Call) -> Result:
        self.keys.authorize(call.actor, call.path["keyId"], "member")
        new, secret, old = self.keys.rotate(call.actor, call.path["keyId"], call.json(RotateRequest))
        now = utcnow()
        return 201, {**new.to_json(now), "secret": secret, "previous_key": old.to_json(now)}

    # -- leaked keys (no authentication: keys/leaks.py) ------------------------------------------
    async def leaked(self, request: Request) -> Response:
        """``POST /v1/inference/keys/leaked``: revoke every key of the report, say which were keys."""
        try:
            address = client_ip(request)
            self.leak_reports.take(address)
            tokens = parse_report(await read_body(request, LEAK_REPORT_MAX_BYTES))
            agent = request.headers.get("user-agent")

            def revoke_all() -> list[dict[str, Any]]:
                return [answer(t, is_ours(t.token) and self.keys.revoke_leaked(
                    t.token.strip(), {"url": t.url, "source": t.source, "type": t.type}, address, agent))
                    for t in tokens]

            return JSON(await run_in_threadpool(revoke_all))
        except QuotagateError as exc:
            return error_response(exc)

    # -- routing -----------------------------------------------------------------------------
    def routes(self, body_limit: int, extra: list[tuple[str, str, Handler]] | None = None) -> list[BaseRoute]:
        """Every route of the console API; ``extra`` adds (method, path, handler) triples."""
        table: list[tuple[str, str, Handler]] = [
            ("GET", "/v1/me", self.me),
            ("GET", "/v1/me/access-tokens", self.list_tokens),
            ("POST", "/v1/me/access-tokens", self.create_token),
            ("DELETE", "/v1/me/access-tokens/{tokenId}", self.revoke_token),
            ("GET", "/v1/me/invitations", self.list_invitations),
            ("POST", "/v1/me/invitations/{projectId}/accept", self.accept_invitation),
            ("DELETE", "/v1/me/invitations/{projectId}", self.decline_invitation),
            ("POST", "/v1/projects", self.create_project),
            ("GET", "/v1/projects", self.list_projects),
            ("GET", "/v1/projects/{projectId}", self.get_project),
            ("PATCH", "/v1/projects/{projectId}", self.update_project),
            ("GET", "/v1/projects/{projectId}/members", self.list_members),
            ("POST", "/v1/projects/{projectId}/members", self.add_member),
            ("PATCH", "/v1/projects/{projectId}/members/{userId}", self.change_member),
            ("DELETE", "/v1/projects/{projectId}/members/{userId}", self.remove_member),
            ("GET", "/v1/projects/{projectId}/audit-log", self.audit_log),
            ("POST", "/v1/projects/{projectId}/inference/keys", self.mint_key),
            ("GET", "/v1/projects/{projectId}/inference/keys", self.list_keys),
            ("GET", "/v1/inference/keys/{keyId}", self.get_key),
            ("PATCH", "/v1/inference/keys/{keyId}", self.update_key),
            ("DELETE", "/v1/inference/keys/{keyId}", self.revoke_key),
            ("POST", "/v1/inference/keys/{keyId}/archive", self.archive_key),
            ("POST", "/v1/inference/keys/{keyId}/unarchive", self.unarchive_key),
            ("POST", "/v1/inference/keys/{keyId}/rotate", self.rotate_key),
            *(extra or []),
        ]
        by_path: dict[str, dict[str, Handler]] = {}
        for method, path, handler in table:
            by_path.setdefault(path, {})[method] = handler
        return [Route("/v1/inference/keys/leaked", self.leaked, methods=["POST"]),
                *(self._route(path, methods, body_limit) for path, methods in by_path.items())]

    def _route(self, path: str, methods: dict[str, Handler], body_limit: int) -> Route:
        wrapped = {m: endpoint(h, self.authenticate, body_limit) for m, h in methods.items()}
        if "GET" in wrapped:
            wrapped["HEAD"] = wrapped["GET"]  # Starlette routes HEAD to GET routes; answer it like GET

        async def dispatch(request: Request) -> object:
            return await wrapped[request.method](request)

        return Route(path, dispatch, methods=list(methods))

