"""The ``quotagate`` command line (CONTRACT §1)."""

from __future__ import annotations

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
from quotagate.settings import Settings, SettingsError

T = TypeVar("T")

HELP = """quotagate: a self-hosted gateway for LLM inference keys.

It serves two APIs from one process: the console API (projects, members, access tokens and
inference keys, authenticated by a user's access token) and an OpenAI-compatible LLM API
(authenticated by an inference key, with per-key rate limits and token budgets).

Getting started, with the SQLite database in ./.quotagate:

\b
  quotagate users create you@example.com --admin
  quotagate tokens create you@example.com    # prints an access token
  quotagate serve                             # console API :8400, LLM API :8401

Every option also reads from an environment variable QUOTAGATE_<OPTION>, e.g.
QUOTAGATE_DATA_DIR, QUOTAGATE_CONFIG, QUOTAGATE_DATABASE_URL; options win over the environment."""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)
users_app = typer.Typer(help="Manage console users (people who sign in to the console API).",
                        no_args_is_help=True, rich_markup_mode=None)
tokens_app = typer.Typer(help="Manage console access tokens (what the console API's Authorization: Bearer "
                         "header carries).", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")

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
    metrics_port: Annotated[int | None, typer.Option(help="Also serve /metrics on a listener of its own at "
                                                     "this port (default: none; the console listener serves "
                                                     "/metrics too). Env: QUOTAGATE_METRICS_PORT.",
                                                     show_default=False)] = None,
    database_url: DatabaseUrlOpt = None,
    redis_url: Annotated[str | None, typer.Option(help="redis://HOST:PORT/DB to share rate limits and "
                                                  "revocations between several instances (default: none, "
                                                  "in-process). Env: QUOTAGATE_REDIS_URL.",
                                                  show_default=False)] = None,
) -> None:
    """Run the console API and the LLM API (bringing the database schema up to date first)."""
    s = settings(config=config, data_dir=data_dir, host=host, console_port=console_port, llm_port=llm_port,
                 role=role, metrics_port=metrics_port, database_url=database_url, redis_url=redis_url)
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
    """Bring the database schema up to date (serve does this too when it starts). Safe to repeat."""
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
    """Create a user (an instance admin with --admin). Then give them an access token with tokens create."""
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
    """Create an access token for a user and print only the token, on stdout (it is shown this once)."""
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


def main() -> None:
    app(prog_name="quotagate")
