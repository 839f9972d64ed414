"""The ``quotagate`` command line (CONTRACT §1)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from quotagate.config import ConfigError
from quotagate.errors import QuotagateError
from quotagate.ids import isoformat
from quotagate.settings import Settings, SettingsError

T = TypeVar("T")

HELP = """quotagate: a self-hosted gateway for LLM inference keys.

It serves two APIs from one process: the console API (projects, members, access tokens and
inference keys, authenticated by a user's access token) and an OpenAI-compatible LLM API
(authenticated by an inference key, with per-key rate limits and token budgets).

Getting started, with the SQLite database in ./.quotagate:

\b
  quotagate users create you@example.com --admin --password-stdin   # type a password (8+ characters)
  quotagate serve              # web console http://127.0.0.1:8400/ (sign in with it), LLM API :8401
  quotagate tokens create you@example.com    # an access token for the console API, for scripts

Every option also reads from an environment variable QUOTAGATE_<OPTION>, e.g.
QUOTAGATE_DATA_DIR, QUOTAGATE_CONFIG, QUOTAGATE_DATABASE_URL; options win over the environment."""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)
users_app = typer.Typer(help="Manage console users. Users are the people who sign in to the web console and "
                        "use the console API.",
                        no_args_is_help=True, rich_markup_mode=None)
tokens_app = typer.Typer(help="Manage console access tokens. A token is what the console API's "
                         "Authorization: Bearer header carries.", no_args_is_help=True, rich_markup_mode=None)
keys_app = typer.Typer(help="Manage a project's inference keys from scripts. The commands act as an operator: "
                       "the audit log records the actor 'quotagate cli'.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")
app.add_typer(keys_app, name="keys")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"quotagate {version('quotagate')}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="TOML file with the model catalog (default: a built-in demo catalog of simulated "
    "models). Env: QUOTAGATE_CONFIG.", show_default=False)]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Directory of the SQLite database and the local usage journal (default: "
    "./.quotagate). Env: QUOTAGATE_DATA_DIR.", show_default=False)]
DatabaseUrlOpt = Annotated[str | None, typer.Option(
    "--database-url", help="sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB (default: SQLite "
    "in the data dir). Env: QUOTAGATE_DATABASE_URL.", show_default=False)]
EmailArg = Annotated[str, typer.Argument(metavar="EMAIL", help="The user's email address.", show_default=False)]


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def settings(**overrides: Any) -> Settings:
    try:
        return Settings.load(overrides)
    except SettingsError as exc:
        raise fail(str(exc)) from None


def _database_problem(s: Settings, exc: SQLAlchemyError) -> typer.Exit:
    """A clear one-line error for a database that cannot be reached or used (no password shown)."""
    where = make_url(s.effective_database_url).render_as_string(hide_password=True)
    cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return fail(f"cannot use the database at {where}: {cause}")


def guarded(s: Settings, action: Callable[[], T]) -> T:
    """Run ``action``, turning configuration and database errors into a clear message and exit code 2."""
    try:
        return action()
    except (ConfigError, SettingsError) as exc:
        raise fail(str(exc)) from None
    except SQLAlchemyError as exc:
        raise _database_problem(s, exc) from None


def runtime(s: Settings) -> Any:
    from quotagate.app import Runtime

    return guarded(s, lambda: Runtime.build(s))


@app.command()
def serve(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default: 127.0.0.1). "
                                             "Env: QUOTAGATE_HOST.", show_default=False)] = None,
    console_port: Annotated[int | None, typer.Option(help="Port of the console API (default: 8400). "
                                                     "Env: QUOTAGATE_CONSOLE_PORT.", show_default=False)] = None,
    llm_port: Annotated[int | None, typer.Option(help="Port of the LLM API (default: 8401). "
                                                 "Env: QUOTAGATE_LLM_PORT.", show_default=False)] = None,
    role: Annotated[str | None, typer.Option(help="Which listeners to run: all, console or llm (default: all). "
                                             "Env: QUOTAGATE_ROLE.", show_default=False)] = None,
    workers: Annotated[int | None, typer.Option(help="Processes serving the LLM API on its one port, with "
                                                "limits exact across them; 0: one per core (default: 1; the "
                                                "console stays in one process). Env: QUOTAGATE_WORKERS.",
                                                show_default=False)] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Also serve /metrics on a listener of its own at "
                                                     "this port (default: none; the console listener serves "
                                                     "/metrics too). Env: QUOTAGATE_METRICS_PORT.",
                                                     show_default=False)] = None,
    simulator_port: Annotated[int | None, typer.Option(help="Port of the simulated model server, when the "
                                                       "configuration has one (the built-in demo does: 8402); "
                                                       "its models follow it. Env: QUOTAGATE_SIMULATOR_PORT.",
                                                       show_default=False)] = None,
    database_url: DatabaseUrlOpt = None,
    redis_url: Annotated[str | None, typer.Option(help="redis://HOST:PORT/DB to share rate limits and "
                                                  "revocations between several instances (default: none, "
                                                  "in-process). Env: QUOTAGATE_REDIS_URL.",
                                                  show_default=False)] = None,
) -> None:
    """Run the console API and the LLM API. The database schema is brought up to date first."""
    s = settings(config=config, data_dir=data_dir, host=host, console_port=console_port, llm_port=llm_port,
                 role=role, workers=workers, metrics_port=metrics_port, simulator_port=simulator_port,
                 database_url=database_url, redis_url=redis_url)
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Alembic announces each of its plugins at INFO on every start; the migrations it runs stay visible.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from quotagate.runner import run

    rt = runtime(s)
    try:
        # uvloop, as make_server asks for: uvicorn only installs it when it creates the loop itself,
        # and serve_all runs the servers inside this one.
        import uvloop

        uvloop.run(run(rt))
    except ConfigError as exc:  # found only when the listeners are built (say, a bad upstream API key)
        raise fail(str(exc)) from None
    finally:
        rt.close()


@app.command("migrate")
def migrate_cmd(config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DatabaseUrlOpt = None) -> None:
    """Bring the database schema up to date. serve does this too when it starts; safe to repeat."""
    from quotagate.store.engine import migrate

    s = settings(config=config, data_dir=data_dir, database_url=database_url)
    guarded(s, lambda: migrate(s.effective_database_url))
    typer.echo("database schema is up to date", err=True)


@users_app.command("create")
def users_create(
    email: EmailArg,
    admin: Annotated[bool, typer.Option("--admin", help="Make the user an instance admin, who may act on "
                                        "every project.")] = False,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read a password (8 characters or "
                                                 "more) for the web console from the first line of "
                                                 "stdin.")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Create a user. --admin makes an instance admin; then sign in, or make a token with tokens create."""
    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    s = settings(config=config, data_dir=data_dir, database_url=database_url)
    rt = runtime(s)
    try:
        user = guarded(s, lambda: rt.accounts.create_user(email, password, is_admin=admin))
    except QuotagateError as exc:
        raise fail(exc.message) from None
    finally:
        rt.close()
    typer.echo(f"created user {user.email} ({user.id}){' as instance admin' if admin else ''}", err=True)


@tokens_app.command("create")
def tokens_create(
    email: EmailArg,
    name: Annotated[str, typer.Option(help="A label for the token, shown when listing tokens.")] = "cli",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Create an access token. Prints only the token, on stdout (it is shown this once)."""
    s = settings(config=config, data_dir=data_dir, database_url=database_url)
    rt = runtime(s)
    try:
        user = guarded(s, lambda: rt.accounts.get_user_by_email(email))
        _token, secret = guarded(s, lambda: rt.accounts.create_token(user, name))
    except QuotagateError as exc:
        raise fail(exc.message) from None
    finally:
        rt.close()
    typer.echo(secret)


def _read_password(stdin: bool) -> str:
    """A password from stdin's first line, or asked for twice on the terminal."""
    if stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(typer.prompt("New password", hide_input=True, confirmation_prompt=True))


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (one list) instead of a table.")]


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _with_runtime(config: Path | None, data_dir: Path | None, database_url: str | None,
                  action: Callable[[Any], T]) -> T:
    """Run ``action(runtime)``; store and validation errors become a clear message and exit code 2."""
    s = settings(config=config, data_dir=data_dir, database_url=database_url)
    rt = runtime(s)
    try:
        return guarded(s, lambda: action(rt))
    except QuotagateError as exc:
        raise fail(exc.message) from None
    finally:
        rt.close()


@users_app.command("list")
def users_list(as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None,
               database_url: DatabaseUrlOpt = None) -> None:
    """List every user. Email, id, whether an instance admin, when created, whether disabled."""
    found = _with_runtime(config, data_dir, database_url, lambda rt: rt.accounts.list_users())
    if as_json:
        typer.echo(json.dumps([{**u.to_json(), "disabled_at": isoformat(d)} for u, d in found]))
        return
    _table([[u.email, u.id, "admin" if u.is_admin else "", isoformat(u.created_at) or "",
             f"disabled {isoformat(d)}" if d else ""] for u, d in found],
           ["EMAIL", "ID", "ROLE", "CREATED", "STATUS"])


@users_app.command("set-password")
def users_set_password(
    email: EmailArg,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from the first "
                                                 "line of stdin instead of asking for it.")] = False,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DatabaseUrlOpt = None,
) -> None:
    """Set a user's password. For the web console, 8 characters or more; their web sessions end."""
    password = _read_password(password_stdin)
    user = _with_runtime(config, data_dir, database_url, lambda rt: rt.accounts.set_password(email, password))
    typer.echo(f"set the password of {user.email}; their web sessions have ended", err=True)


@users_app.command("disable")
def users_disable(email: EmailArg, config: ConfigOpt = None, data_dir: DataDirOpt = None,
                  database_url: DatabaseUrlOpt = None) -> None:
    """Disable a user. No sign-in, and every access token and session of theirs stops working at once;
    their projects and the projects' inference keys are left as they are."""
    user = _with_runtime(config, data_dir, database_url, lambda rt: rt.accounts.set_disabled(email, True))
    typer.echo(f"disabled {user.email}; their access tokens and sessions are revoked", err=True)


@users_app.command("enable")
def users_enable(email: EmailArg, config: ConfigOpt = None, data_dir: DataDirOpt = None,
                 database_url: DatabaseUrlOpt = None) -> None:
    """Enable a disabled user again. Their old tokens stay revoked: give them new ones."""
    user = _with_runtime(config, data_dir, database_url, lambda rt: rt.accounts.set_disabled(email, False))
    typer.echo(f"enabled {user.email}", err=True)


@tokens_app.command("list")
def tokens_list(email: EmailArg, as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None,
                database_url: DatabaseUrlOpt = None) -> None:
    """List a user's access tokens and web sessions. Never their secrets."""
    found = _with_runtime(config, data_dir, database_url,
                          lambda rt: rt.accounts.list_tokens(rt.accounts.get_user_by_email(email)))
    if as_json:
        typer.echo(json.dumps([t.to_json() for t in found]))
        return
    _table([[t.id, t.kind, t.name, t.prefix, t.status, isoformat(t.last_used_at) or "never"] for t in found],
           ["ID", "KIND", "NAME", "PREFIX", "STATUS", "LAST USED"])


@tokens_app.command("revoke")
def tokens_revoke(email: EmailArg,
                  token_id: Annotated[str, typer.Argument(metavar="TOKEN_ID", help="The token's id (tok_…), "
                                                          "as tokens list shows it.", show_default=False)],
                  config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DatabaseUrlOpt = None) -> None:
    """Revoke an access token or web session of a user. Repeating it is harmless."""
    token = _with_runtime(config, data_dir, database_url,
                          lambda rt: rt.accounts.revoke_token(rt.accounts.get_user_by_email(email), token_id))
    typer.echo(f"revoked {token.id} ({token.name})", err=True)


ProjectArg = Annotated[str, typer.Argument(metavar="PROJECT_ID", help="The project's id (proj_…).",
                                           show_default=False)]


def _operator() -> Any:
    """Who the key commands act as: an operator with the store in hand, recorded as such in the audit log."""
    from quotagate.accounts.models import Actor, User
    from quotagate.ids import utcnow

    return Actor(user=User(id="cli", email="quotagate cli", is_admin=True, created_at=utcnow()),
                 user_agent="quotagate cli")


@keys_app.command("list")
def keys_list(project: ProjectArg, archived: Annotated[bool, typer.Option("--archived", help="Include archived "
                                                                          "keys.")] = False,
              as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None,
              database_url: DatabaseUrlOpt = None) -> None:
    """List a project's inference keys. Masked prefixes, never secrets; newest first."""
    from quotagate.ids import utcnow

    found = _with_runtime(config, data_dir, database_url,
                          lambda rt: rt.keys.list_keys(_operator(), project, include_archived=archived, limit=10_000))
    now = utcnow()
    if as_json:
        typer.echo(json.dumps([k.to_json(now) for k in found]))
        return
    _table([[k.id, k.name, k.prefix, k.status(now), _limits(k)] for k in found],
           ["ID", "NAME", "PREFIX", "STATUS", "LIMITS"])


def _limits(key: Any) -> str:
    parts = [f"rpm {key.rpm}" if key.rpm else "", f"tpm {key.tpm}" if key.tpm else "",
             f"{key.token_limit}/{key.token_limit_period}" if key.token_limit else ""]
    return ", ".join(p for p in parts if p) or "none"


@keys_app.command("create")
def keys_create(
    project: ProjectArg,
    name: Annotated[str, typer.Option(help="The key's name.", show_default=False)],
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.", show_default=False)] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute.", show_default=False)] = None,
    token_limit: Annotated[int | None, typer.Option(help="A hard token budget per --token-limit-period.",
                                                    show_default=False)] = None,
    token_limit_period: Annotated[str | None, typer.Option(help="minute, hour, day, week or month.",
                                                           show_default=False)] = None,
    model: Annotated[list[str] | None, typer.Option("--model", help="A model the key may use (repeat it; "
                                                    "default: every model).", show_default=False)] = None,
    expires_at: Annotated[str | None, typer.Option(help="When the key stops working (ISO 8601).",
                                                   show_default=False)] = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DatabaseUrlOpt = None,
) -> None:
    """Mint an inference key. Only its secret is printed, on stdout (shown this once); its id on stderr."""
    from pydantic import ValidationError

    from quotagate.keys.schemas import KeyCreate

    fields = {"name": name, "rpm": rpm, "tpm": tpm, "token_limit": token_limit,
              "token_limit_period": token_limit_period, "allowed_models": model or None, "expires_at": expires_at}
    try:
        body = KeyCreate.model_validate_json(json.dumps({k: v for k, v in fields.items() if v is not None}))
    except ValidationError as exc:
        first = exc.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-").replace("allowed-models", "model")
        raise fail(f"{option}: {first['msg']}") from None
    key, secret = _with_runtime(config, data_dir, database_url, lambda rt: rt.keys.mint(_operator(), project, body))
    typer.echo(f"minted {key.id} ({key.name}) in {key.project_id}", err=True)
    typer.echo(secret)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="The key's id (key_…).",
                                                      show_default=False)],
                config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DatabaseUrlOpt = None) -> None:
    """Revoke an inference key. At once and for good: a running gateway refuses it on its next request."""
    key = _with_runtime(config, data_dir, database_url, lambda rt: _revoke(rt, key_id))
    typer.echo(f"revoked {key.id} ({key.name})", err=True)


def _revoke(rt: Any, key_id: str) -> Any:
    """Revoke, and tell the running instances. With Redis, through it, at once (the console API's way);
    without, the gateway sharing the database sees it when its key cache next refreshes the key (within
    5 s of its next use)."""
    import asyncio

    from quotagate.keys.events import KeyChanged

    changes: list[KeyChanged] = []
    rt.events.subscribe(changes.append)
    key = rt.keys.revoke(_operator(), key_id)
    broadcaster = rt.extras.get("broadcaster")
    if broadcaster is not None and changes:

        async def announce() -> None:
            try:
                await broadcaster.announce(changes[-1])
            finally:
                await rt.limiter.close()

        asyncio.run(announce())
    return key


def main() -> None:
    app(prog_name="quotagate")
