"""The ``quotagate`` command line (CONTRACT §1)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from quotagate.config import ConfigError
from quotagate.errors import QuotagateError
from quotagate.settings import Settings, SettingsError

app = typer.Typer(
    help="quotagate: a self-hosted gateway for LLM inference keys.\n\n"
    "Every option also reads from QUOTAGATE_<OPTION> (e.g. QUOTAGATE_DATABASE_URL).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
users_app = typer.Typer(help="Manage console users.", no_args_is_help=True)
tokens_app = typer.Typer(help="Manage console access tokens.", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML model catalog (default: built-in demo with "
                                                "simulated models). Env: QUOTAGATE_CONFIG.", show_default=False)]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Where the SQLite database and journal live "
                                                 "[default: ./.quotagate]. Env: QUOTAGATE_DATA_DIR.",
                                                 show_default=False)]


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def settings(**overrides: Any) -> Settings:
    try:
        return Settings.load(overrides)
    except SettingsError as exc:
        raise fail(str(exc)) from None


def runtime(s: Settings) -> Any:
    from quotagate.app import Runtime

    try:
        return Runtime.build(s)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    except SettingsError as exc:
        raise fail(str(exc)) from None


@app.command()
def serve(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on [default: 127.0.0.1].",
                                             show_default=False)] = None,
    console_port: Annotated[int | None, typer.Option(help="Console API port [default: 8400].",
                                                     show_default=False)] = None,
    llm_port: Annotated[int | None, typer.Option(help="LLM API port [default: 8401].", show_default=False)] = None,
    role: Annotated[str | None, typer.Option(help="all | console | llm [default: all].",
                                             show_default=False)] = None,
    database_url: Annotated[str | None, typer.Option(help="sqlite:///PATH or postgresql://… "
                                                     "[default: SQLite in the data dir].", show_default=False)] = None,
    redis_url: Annotated[str | None, typer.Option(help="redis://… to share limits and revocations between "
                                                  "instances.", show_default=False)] = None,
) -> None:
    """Run the console API and the LLM API (migrating the database first)."""
    s = settings(config=config, data_dir=data_dir, host=host, console_port=console_port, llm_port=llm_port,
                 role=role, database_url=database_url, redis_url=redis_url)
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from quotagate.runner import run

    rt = runtime(s)
    try:
        asyncio.run(run(rt))
    finally:
        rt.close()


@app.command("migrate")
def migrate_cmd(config: ConfigOpt = None, data_dir: DataDirOpt = None,
                database_url: Annotated[str | None, typer.Option(show_default=False)] = None) -> None:
    """Bring the database schema up to date."""
    from quotagate.store.engine import migrate

    s = settings(config=config, data_dir=data_dir, database_url=database_url)
    migrate(s.effective_database_url)
    typer.echo("database schema is up to date", err=True)


@users_app.command("create")
def users_create(
    email: str,
    admin: Annotated[bool, typer.Option("--admin", help="Make the user an instance admin.")] = False,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read a password for the web console "
                                                 "from the first line of stdin.")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Create a user (an instance admin with --admin)."""
    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    rt = runtime(settings(config=config, data_dir=data_dir))
    try:
        user = rt.accounts.create_user(email, password, is_admin=admin)
    except QuotagateError as exc:
        raise fail(exc.message) from None
    finally:
        rt.close()
    typer.echo(f"created user {user.email} ({user.id}){' as instance admin' if admin else ''}", err=True)


@tokens_app.command("create")
def tokens_create(
    email: str,
    name: Annotated[str, typer.Option(help="A label for the token.")] = "cli",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Create an access token for a user; prints only the token, on stdout."""
    rt = runtime(settings(config=config, data_dir=data_dir))
    try:
        user = rt.accounts.get_user_by_email(email)
        _token, secret = rt.accounts.create_token(user, name)
    except QuotagateError as exc:
        raise fail(exc.message) from None
    finally:
        rt.close()
    typer.echo(secret)


def main() -> None:
    app(prog_name="quotagate")
