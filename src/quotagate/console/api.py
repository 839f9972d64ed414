"""The console API's routes (CONTRACT §3): projects, members, access tokens, keys, audit log."""

from __future__ import annotations

from collections.abc import Iterable
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
from quotagate.keys.leaks import MAX_TOKENS, LeakedToken, ReportThrottle, answer, is_ours, parse_report
from quotagate.keys.schemas import KeyCreate, KeyUpdate, RotateRequest
from quotagate.keys.service import KeyService
from quotagate.openapi import answers as a
from quotagate.openapi.spec import Param, operation, operation_of


def page_limit(call: Call, default: int = 100, maximum: int = 1000) -> int:
    raw = call.query.get("limit")
    if raw is None:
        return default
    # isascii: str.isdigit() is also true of digits int() refuses, such as "²".
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:
        raise InvalidRequest(f"limit: must be a whole number from 1 to {maximum}, not {raw!r}", field="limit")
    return int(raw)


def check_params(call: Call, params: Iterable[Param]) -> None:
    """400 for a query parameter the endpoint does not know (a misspelt cursor would page forever)."""
    allowed = {p.name for p in params}
    unknown = sorted(set(call.query.keys()) - allowed)
    if unknown:
        raise InvalidRequest(f"{unknown[0]}: unknown query parameter; expected one of {', '.join(sorted(allowed))}",
                             field=unknown[0])


LEAK_REPORT_MAX_BYTES = 1024 * 1024  # a report of MAX_TOKENS tokens with their URLs

# The query parameters of the endpoints that read them: ``check_params`` refuses any other, and the
# OpenAPI document lists exactly these (the operations below name the same tuples).
ID = {"type": "string"}
LIMIT = Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
              "How many to return (1-1000, default 100)")
BEFORE = Param("before", ID, "A cursor: the `next_cursor` of the previous page (the last id it held)")
STARTING_AFTER = Param("starting_after", ID, "The same as `before` (OpenAI's name for it)")
INCLUDE_ARCHIVED = Param("include_archived", {"type": "boolean", "default": False},
                         "Whether archived keys are listed too (true/false, 1/0, yes/no)")
KEY_LIST_PARAMS = (INCLUDE_ARCHIVED, LIMIT, BEFORE, STARTING_AFTER)
PROJECT_LIST_PARAMS = (LIMIT, BEFORE, STARTING_AFTER)
AUDIT_PARAMS = (LIMIT, BEFORE)

ME, PROJECTS, MEMBERS, KEYS, AUDIT = "Me and access tokens", "Projects", "Members", "Inference keys", "Audit log"


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
    @operation("The caller", ME, answer=a.User)
    def me(self, call: Call) -> Result:
        return 200, call.actor.user.to_json()

    @operation("List your access tokens", ME, answer=a.AccessTokenList,
               description="Newest first; never the tokens themselves.")
    def list_tokens(self, call: Call) -> Result:
        tokens = self.accounts.list_tokens(call.actor.user)
        return 200, {"object": "list", "data": [t.to_json() for t in tokens]}

    @operation("Create an access token", ME, status=201, body=TokenCreate, answer=a.NewAccessToken,
               description="The answer holds the token: the only time it is shown.")
    def create_token(self, call: Call) -> Result:
        body = call.json(TokenCreate)
        token, secret = self.accounts.create_token(call.actor.user, body.name)
        return 201, {**token.to_json(), "token": secret}

    @operation("Revoke an access token", ME, answer=a.AccessToken,
               description="It stops working on the very next request; repeating is harmless.")
    def revoke_token(self, call: Call) -> Result:
        return 200, self.accounts.revoke_token(call.actor.user, call.path["tokenId"]).to_json()

    # -- invitations (the invited user's side) -------------------------------------------------
    @operation("List your invitations", MEMBERS, answer=a.InvitationList)
    def list_invitations(self, call: Call) -> Result:
        found = self.accounts.list_invitations(call.actor.user)
        return 200, {"object": "list", "data": [i.to_json() for i in found]}

    @operation("Accept an invitation", MEMBERS, answer=a.Project,
               description="You become a member with the invited role; the answer is the project.")
    def accept_invitation(self, call: Call) -> Result:
        return 200, self.accounts.accept_invitation(call.actor, call.path["projectId"]).to_json()

    @operation("Decline an invitation", MEMBERS, status=204)
    def decline_invitation(self, call: Call) -> Result:
        self.accounts.decline_invitation(call.actor, call.path["projectId"])
        return 204, None

    # -- projects and members ----------------------------------------------------------------
    @operation("Create a project", PROJECTS, status=201, body=ProjectCreate, answer=a.Project, errors=(409,),
               description="You become its owner. 409 `project_limit_reached` past the per-user limit.")
    def create_project(self, call: Call) -> Result:
        return 201, self.accounts.create_project(call.actor, call.json(ProjectCreate)).to_json()

    @operation("List your projects", PROJECTS, answer=a.ProjectPage, params=PROJECT_LIST_PARAMS,
               description="Newest first, in pages (instance admins: every project).")
    def list_projects(self, call: Call) -> Result:
        check_params(call, PROJECT_LIST_PARAMS)
        limit = page_limit(call)
        before = call.query.get("before") or call.query.get("starting_after")
        found = self.accounts.list_projects(call.actor, limit=limit + 1, before=before)
        more = len(found) > limit
        return 200, {"object": "list", "data": [p.to_json() for p in found[:limit]], "has_more": more,
                     "next_cursor": found[limit - 1].id if more else None}

    @operation("Get a project", PROJECTS, answer=a.Project, role="viewer")
    def get_project(self, call: Call) -> Result:
        return 200, self.accounts.get_project(call.actor, call.path["projectId"]).to_json()

    @operation("Change a project", PROJECTS, body=ProjectUpdate, answer=a.Project, role="owner")
    def update_project(self, call: Call) -> Result:
        self.accounts.authorize(call.actor, call.path["projectId"], "owner")
        body = call.json(ProjectUpdate)
        return 200, self.accounts.update_project(call.actor, call.path["projectId"], body).to_json()

    @operation("List members and invitations", MEMBERS, answer=a.MemberList, role="viewer")
    def list_members(self, call: Call) -> Result:
        members = self.accounts.list_members(call.actor, call.path["projectId"])
        return 200, {"object": "list", "data": [m.to_json() for m in members]}

    @operation("Invite a member", MEMBERS, status=201, body=MemberAdd, answer=a.Member, role="owner",
               errors=(409,), description="Nothing is granted until they accept. 409 if already a member or "
                                          "invited.")
    def add_member(self, call: Call) -> Result:
        self.accounts.authorize(call.actor, call.path["projectId"], "owner")
        body = call.json(MemberAdd)
        return 201, self.accounts.add_member(call.actor, call.path["projectId"], body).to_json()

    @operation("Change a member's role", MEMBERS, body=MemberUpdate, answer=a.Member, role="owner",
               errors=(409,), description="409 if it would leave the project without an owner.")
    def change_member(self, call: Call) -> Result:
        self.accounts.authorize(call.actor, call.path["projectId"], "owner")
        body = call.json(MemberUpdate)
        member = self.accounts.change_member(call.actor, call.path["projectId"], call.path["userId"], body)
        return 200, member.to_json()

    @operation("Remove a member (or withdraw an invitation)", MEMBERS, status=204, role="owner",
               errors=(409,), description="Anyone may remove themselves. 409 for the last owner.")
    def remove_member(self, call: Call) -> Result:
        self.accounts.remove_member(call.actor, call.path["projectId"], call.path["userId"])
        return 204, None

    @operation("The project's audit log", AUDIT, answer=a.AuditLog, role="viewer", params=AUDIT_PARAMS,
               description="Newest first.")
    def audit_log(self, call: Call) -> Result:
        project_id = call.path["projectId"]
        self.accounts.get_project(call.actor, project_id)  # 404 unless the caller may read it
        check_params(call, AUDIT_PARAMS)
        events = self.audit.list(project_id, limit=page_limit(call), before=call.query.get("before"))
        return 200, {"object": "list", "data": events}

    # -- inference keys ----------------------------------------------------------------------
    @operation("Mint an inference key", KEYS, status=201, body=KeyCreate, answer=a.NewKey, role="member",
               description="The answer holds the key's secret: the only time it is shown.")
    def mint_key(self, call: Call) -> Result:
        self.accounts.authorize(call.actor, call.path["projectId"], "member")
        key, secret = self.keys.mint(call.actor, call.path["projectId"], call.json(KeyCreate))
        return 201, {**key.to_json(utcnow()), "secret": secret}

    @operation("List a project's keys", KEYS, answer=a.KeyPage, role="viewer", params=KEY_LIST_PARAMS,
               description="Newest first, in pages; archived keys only with include_archived.")
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

    @operation("Get a key", KEYS, answer=a.Key, role="viewer")
    def get_key(self, call: Call) -> Result:
        return 200, self.keys.get(call.actor, call.path["keyId"]).to_json(utcnow())

    @operation("Change a key", KEYS, body=KeyUpdate, answer=a.Key, role="member", errors=(409,),
               description="Only the fields present change; null clears. 409 for a revoked or archived key.")
    def update_key(self, call: Call) -> Result:
        self.keys.authorize(call.actor, call.path["keyId"], "member")
        return 200, self.keys.update(call.actor, call.path["keyId"], call.json(KeyUpdate)).to_json(utcnow())

    @operation("Revoke a key", KEYS, answer=a.Key, role="member",
               description="At once and for good; repeating is harmless.")
    def revoke_key(self, call: Call) -> Result:
        return 200, self.keys.revoke(call.actor, call.path["keyId"]).to_json(utcnow())

    @operation("Archive a key", KEYS, answer=a.Key, role="member", errors=(409,),
               description="Hides a revoked or expired key from the list; 409 for an active key.")
    def archive_key(self, call: Call) -> Result:
        return 200, self.keys.set_archived(call.actor, call.path["keyId"], True).to_json(utcnow())

    @operation("Unarchive a key", KEYS, answer=a.Key, role="member", errors=(409,))
    def unarchive_key(self, call: Call) -> Result:
        return 200, self.keys.set_archived(call.actor, call.path["keyId"], False).to_json(utcnow())

    @operation("Rotate a key", KEYS, status=201, body=RotateRequest, answer=a.RotatedKey, role="member",
               errors=(409,), description="Mints its successor with the same settings; the old key expires "
                                          "after the grace period. 409 unless the key is active.")
    def rotate_key(self, call: Call) -> Result:
        self.keys.authorize(call.actor, call.path["keyId"], "member")
        new, secret, old = self.keys.rotate(call.actor, call.path["keyId"], call.json(RotateRequest))
        now = utcnow()
        return 201, {**new.to_json(now), "secret": secret, "previous_key": old.to_json(now)}

    # -- leaked keys (no authentication: keys/leaks.py) ------------------------------------------
    @operation("Report leaked keys", KEYS, public=True, errors=(429,), models=(LeakedToken, a.LeakAnswer),
               body_schema={"type": "array", "maxItems": MAX_TOKENS, "items": {"$ref": "LeakedToken"}},
               answer_schema={"type": "array", "items": {"$ref": "LeakAnswer"}},
               description="No authentication (for secret scanners). Every token that is one of our keys is "
                           "revoked at once. The answer lists every token, in order.")
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
    def table(self, extra: list[tuple[str, str, Handler]] | None = None) -> list[tuple[str, str, Handler]]:
        """The console API's (method, path, handler) triples, ``extra`` added: its routes (``routes``) and
        its OpenAPI document (``openapi.document``) are both made from this."""
        return [
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
            ("POST", "/v1/inference/keys/leaked", self.leaked),  # type: ignore[list-item]  # no token: below
            *(extra or []),
        ]

    def routes(self, body_limit: int, table: list[tuple[str, str, Handler]]) -> list[BaseRoute]:
        """The routes of ``table`` (see ``table``)."""
        by_path: dict[str, dict[str, Handler]] = {}
        public: list[BaseRoute] = []
        for method, path, handler in table:
            if operation_of(handler).public:  # its own plumbing (no access token): served as it is
                public.append(Route(path, handler, methods=[method]))
            else:
                by_path.setdefault(path, {})[method] = handler
        # The public routes first: /v1/inference/keys/leaked before /v1/inference/keys/{keyId}.
        return [*public, *(self._route(path, methods, body_limit) for path, methods in by_path.items())]

    def _route(self, path: str, methods: dict[str, Handler], body_limit: int) -> Route:
        wrapped = {m: endpoint(h, self.authenticate, body_limit) for m, h in methods.items()}
        if "GET" in wrapped:
            wrapped["HEAD"] = wrapped["GET"]  # Starlette routes HEAD to GET routes; answer it like GET

        async def dispatch(request: Request) -> object:
            return await wrapped[request.method](request)

        return Route(path, dispatch, methods=list(methods))

