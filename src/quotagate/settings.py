"""Process settings: where the data lives, which stores to use, which ports to serve.

Every field can be set by a command-line option or by an environment variable
``QUOTAGATE_<FIELD>`` (e.g. ``QUOTAGATE_DATABASE_URL``); options win over the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Role = Literal["all", "console", "llm"]

ENV_PREFIX = "QUOTAGATE_"


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Field(default=Path(".quotagate"), description="SQLite database and local journal")
    config: Path | None = Field(default=None, description="TOML file with the model catalog")
    database_url: str | None = Field(default=None, description="sqlite:///… (default) or postgresql://…")
    redis_url: str | None = Field(default=None, description="shared limiter and revocation broadcast")
    redis_failure_policy: Literal["closed", "open-rates", "open"] = Field(
        default="closed", description="with Redis unreachable: refuse requests (closed), admit keys without a "
        "token budget unchecked (open-rates), or admit every key unchecked (open)")
    host: str = "127.0.0.1"
    console_port: int = Field(default=8400, ge=0, le=65535)
    llm_port: int = Field(default=8401, ge=0, le=65535)
    metrics_port: int | None = Field(default=None, ge=1, le=65535,
                                     description="a listener of its own for /metrics and /healthz")
    metrics_host: str = Field(default="127.0.0.1", description="the address the metrics listener binds")
    simulator_port: int | None = Field(default=None, ge=1, le=65535, description="the port of the "
                                       "configuration's [simulator] (default: its own, 8402 in the demo); the "
                                       "models it serves follow it")
    role: Role = "all"
    workers: int = Field(default=1, ge=0, le=1024, description="processes serving the LLM API on its one "
                         "port, with limits exact across them; 0: one per core")
    keepalive_seconds: int = Field(default=75, ge=1, le=3600, description="how long both listeners keep an "
                                     "idle client connection open")
    forwarded_allow_ips: str = Field(default="127.0.0.1,::1", description="comma-separated addresses (or "
                                     "'*') of proxies whose X-Forwarded-For/-Proto the console believes")
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=3600, description="how long the LLM listener "
                                        "waits for more of a request body that stalls before answering 408")
    max_connections: int | None = Field(default=None, ge=1, le=100_000_000, description="client connections "
                                        "each listener keeps open at once; default: a quarter of the open-file "
                                        "limit left after a reserve")
    max_connections_per_address: int = Field(default=1024, ge=0, le=100_000_000, description="client "
                                              "connections one address (an IPv6 /64) may hold on a listener; "
                                              "0: no cap (behind a load balancer)")
    first_head_timeout_seconds: float = Field(default=10.0, gt=0, le=3600, description="how long a new "
                                              "connection may take to send its first whole request head")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    console_max_body_bytes: int = Field(default=64 * 1024, gt=0)
    llm_max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    leak_reports_per_minute: int = Field(default=30, ge=0, le=1_000_000, description="leaked-key reports "
                                         "(POST /v1/inference/keys/leaked) one client address may send a minute "
                                         "(0: no limit)")
    cors_origins: str = Field(default="", description="comma-separated origins (https://app.example.com) whose "
                              "browser pages may call the LLM API, or '*' for any; none by default")
    llm_auth_failures_per_minute: int = Field(default=100, ge=0, description="unknown (well-formed) keys one "
                                              "client address may send a minute before its lookups stop (0: no limit)")
    database_pool_size: int = Field(default=10, ge=1, le=1000,
                                    description="PostgreSQL connections kept per process (as many again on demand)")
    session_max_age_seconds: int = Field(default=14 * 86400, ge=1, description="a web console session ends this "
                                         "long after sign-in, however much it is used")
    session_idle_seconds: int = Field(default=86400, ge=1, description="a web console session ends when unused "
                                      "for this long")
    login_free_attempts: int = Field(default=5, ge=1, le=1000, description="sign-in attempts per email and "
                                     "client address before each further one must wait (1 s, 2 s, 4 s, ...)")
    login_address_free_attempts: int = Field(default=20, ge=1, le=100000, description="sign-in attempts per "
                                             "client address, whatever the emails, before the delays start")
    login_max_delay_seconds: int = Field(default=900, ge=1, le=86400, description="the longest wait the "
                                         "sign-in throttle imposes between two attempts")
    login_hash_concurrency: int | None = Field(default=None, ge=1, le=256, description="password checks run at "
                                               "once (each takes 64 MiB); default: the cores, at most 8")
    login_hash_queue: int = Field(default=16, ge=0, le=10000, description="sign-ins that may wait for a password "
                                  "check; more are answered 503 at once")
    max_projects_per_user: int = Field(default=100, ge=0, le=1_000_000, description="projects one user may "
                                       "create (instance admins: no limit)")
    console_origin: str | None = Field(default=None, description="the web console's public origin "
                                       "(https://console.example.com); sign-in posts from elsewhere are refused")
    shipper_nice: int = Field(default=19, ge=0, le=19, description="the usage shipper process's niceness: "
                              "19 lets serving come first; lower it if usage must reach the store sooner on a "
                              "saturated core")
    webhook_signing_key: str | None = Field(default=None, min_length=32, max_length=512, description="the key "
                                            "every webhook's signing secret is derived from; the same on every "
                                            "instance (default: one generated in the data dir)")
    webhook_poll_seconds: float = Field(default=5.0, gt=0, le=3600, description="how often an instance looks "
                                        "for budget thresholds crossed and key events, and for deliveries due")
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=300, description="how long one webhook "
                                           "delivery may take (connect, send, answer)")
    webhook_retry_base_seconds: float = Field(default=30.0, gt=0, le=86400, description="the wait after a "
                                              "failed delivery; doubled after each further failure (at most 6 h)")
    webhook_max_attempts: int = Field(default=10, ge=1, le=100, description="attempts before a delivery is "
                                      "given up as failed")

    @field_validator("console_origin")
    @classmethod
    def _an_origin(cls, value: str | None) -> str | None:
        if not value:
            return None
        origin = value.strip().rstrip("/").lower()
        scheme, _, rest = origin.partition("://")
        if scheme not in ("http", "https") or not rest or "/" in rest or "?" in rest or "#" in rest:
            raise ValueError("must be an origin: http(s)://HOST[:PORT], with no path")
        return origin

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        origins = [o.strip().rstrip("/").lower() for o in value.split(",") if o.strip()]
        for origin in origins:
            scheme, _, rest = origin.partition("://")
            if origin != "*" and (scheme not in ("http", "https") or not rest or any(c in rest for c in "/?#*")):
                raise ValueError(f"{origin!r} is not an origin: each must be http(s)://HOST[:PORT] with no path, "
                                 "or '*'")
        return ",".join(origins)

    @property
    def cors_origin_set(self) -> frozenset[str]:
        return frozenset(self.cors_origins.split(",")) if self.cors_origins else frozenset()

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        # Checked at load time, so that every command refuses a bad URL with the same clear message.
        if value:
            normalise_database_url(value)
        return value

    @property
    def effective_workers(self) -> int:
        """How many processes serve the LLM API: the setting, or (0) the cores this process may run on."""
        if self.workers:
            return self.workers
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    @property
    def effective_database_url(self) -> str:
        """The SQLAlchemy URL of the store: the configured one, else SQLite in the data dir."""
        if self.database_url:
            return normalise_database_url(self.database_url)
        return f"sqlite:///{(self.data_dir / 'quotagate.db').resolve()}"

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from the environment, then the given overrides (None values are ignored)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw not in (None, ""):
                values[name] = raw
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = value
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(_describe(err["loc"], err["msg"]) for err in exc.errors())
            raise SettingsError(problems) from None


def normalise_database_url(url: str) -> str:
    """Map the plain ``postgresql://`` scheme onto the psycopg 3 driver SQLAlchemy should use.

    Raises ValueError for any other scheme (the message shows the scheme only, never a password)."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    if not url.startswith(("sqlite://", "postgresql+psycopg://")):
        raise ValueError(f"unsupported scheme {url.split(':', 1)[0]!r}; "
                         "use sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB")
    return url


def _describe(loc: tuple[int | str, ...], msg: str) -> str:
    name = str(loc[0]) if loc else "settings"
    return f"{ENV_PREFIX}{name.upper()} / --{name.replace('_', '-')}: {msg.removeprefix('Value error, ')}"
