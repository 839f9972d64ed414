"""The TOML configuration file: the model catalog and the optional built-in simulator.

```toml
[[models]]
id = "qwen3.6-27b"
type = "chat"                                # "chat", "embedding" or "rerank"
upstreams = ["http://127.0.0.1:8000/v1"]
upstream_model = "Qwen/Qwen3.6-27B-Instruct" # optional: the name the model servers know it by (default: id)
upstream_api_key_env = "VLLM_API_KEY"        # optional
context_length = 32768                       # optional: the model's context, in tokens
tokenizer = "qwen/tokenizer.json"            # optional: count prompts exactly (relative to this file)
created = 2026-11-30                         # optional: its `created` in /v1/models (default: this file's time)

[simulator]                                  # optional: a simulated model server, for demos and tests
port = 8402
```
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from importlib import resources
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ModelType = Literal["chat", "embedding", "rerank"]


class ConfigError(ValueError):
    """The configuration file is missing or invalid; the message names the file and the field."""


class _ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
    type: ModelType = "chat"
    upstreams: list[str] = Field(min_length=1)
    upstream_model: str | None = Field(default=None, min_length=1, max_length=500)
    upstream_api_key_env: str | None = None
    timeout_seconds: float = Field(default=600.0, gt=0)
    context_length: int | None = Field(default=None, gt=0, le=100_000_000)
    tokenizer: str | None = Field(default=None, min_length=1)
    chat_template: str | None = Field(default=None, min_length=1)
    created: datetime | date | None = None

    @field_validator("upstream_model")
    @classmethod
    def _upstream_model(cls, value: str | None) -> str | None:
        if value is not None and (value != value.strip() or any(c < " " for c in value)):
            raise ValueError("must not have surrounding spaces or control characters")
        return value

    @field_validator("upstreams")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstream {url!r} must be an http:// or https:// base URL")
            parts = urlsplit(url)
            try:
                parts.port  # noqa: B018 - raises on a port that is not a number in 0-65535
            except ValueError:
                raise ValueError(f"upstream {url!r} has an invalid port") from None
            if not parts.hostname:
                raise ValueError(f"upstream {url!r} has no host")
            if parts.username is not None:
                raise ValueError(f"upstream {url!r} has credentials in it; name an env var holding the "
                                 "upstream's API key in upstream_api_key_env instead")
            if parts.query or parts.fragment:
                raise ValueError(f"upstream {url!r} must be a base URL, without a query or fragment")
            if any(c <= " " or c > "~" for c in parts.path):
                raise ValueError(f"upstream {url!r} has a space, control or non-ASCII character in its path "
                                 "(percent-encode it)")
        return [url.rstrip("/") for url in value]


class _SimulatorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8402, ge=0, le=65535)
    tokens_per_second: float = Field(default=200.0, gt=0)


class _GatewayEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_max_tokens: int = Field(default=4096, gt=0, description="max_tokens the gateway sets when absent")
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    upstream_request_id: Literal["uuid", "none"] = "uuid"


class _ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[_ModelEntry] = Field(default_factory=list)
    simulator: _SimulatorEntry | None = None
    gateway: _GatewayEntry = Field(default_factory=_GatewayEntry)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    id: str
    type: ModelType
    upstreams: tuple[str, ...]
    upstream_api_key_env: str | None = None
    timeout_seconds: float = 600.0
    context_length: int | None = None   # the model's context in tokens: no completion is longer
    tokenizer: Path | None = None       # its tokenizer.json: prompts are counted exactly (tokens/)
    chat_template: Path | None = None   # a Jinja chat template file, instead of tokenizer_config.json's
    upstream_model: str | None = None   # the model's name on its servers, sent instead of ``id``
    created: int = 0                    # Unix seconds: ``created`` in /v1/models


@dataclass(frozen=True, slots=True)
class SimulatorSpec:
    host: str
    port: int
    tokens_per_second: float


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    default_max_tokens: int = 4096
    connect_timeout_seconds: float = 5.0
    upstream_request_id: Literal["uuid", "none"] = "uuid"   # X-Request-Id to the model servers, or none


@dataclass(frozen=True, slots=True)
class Config:
    """The loaded configuration; ``models`` is keyed by model id."""

    models: dict[str, ModelSpec] = field(default_factory=dict)
    simulator: SimulatorSpec | None = None
    gateway: GatewaySpec = field(default_factory=GatewaySpec)
    source: str = "<empty>"

    @property
    def model_ids(self) -> frozenset[str]:
        return frozenset(self.models)


DEMO_CONFIG_NAME = "demo.toml"


def load_config(path: Path | None) -> Config:
    """Load the config file at ``path``, or the built-in demo configuration when ``path`` is None."""
    if path is None:
        demo = resources.files("quotagate").joinpath(DEMO_CONFIG_NAME)
        return parse_config(demo.read_text(encoding="utf-8"), source=f"built-in {DEMO_CONFIG_NAME} (simulated models)",
                            base=Path(str(demo)).parent, created=_mtime(Path(str(demo))))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return parse_config(text, source=str(path), base=path.resolve().parent, created=_mtime(path))


def _mtime(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def _unix(value: datetime | date | None, default: int) -> int:
    """A catalog entry's ``created`` (a TOML date or date-time; UTC unless it says otherwise) in Unix seconds."""
    if value is None:
        return default
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day, tzinfo=UTC)
    elif value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp())


def _file(source: str, model: str, name: str, value: str | None, base: Path | None) -> Path | None:
    """A file the catalog names (relative to the config file's folder), which must exist."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise ConfigError(f"{source}: models: {model}: {name} {value!r}: no such file ({path})")
    return path


def parse_config(text: str, source: str = "<string>", base: Path | None = None, created: int = 0) -> Config:
    """Parse and validate configuration text; errors name the source and the offending field. Relative
    file names in it are taken from ``base`` (the config file's folder)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        parsed = _ConfigFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None
    models: dict[str, ModelSpec] = {}
    for entry in parsed.models:
        if entry.id in models:
            raise ConfigError(f"{source}: models: model id {entry.id!r} appears twice")
        if entry.chat_template is not None and entry.tokenizer is None:
            raise ConfigError(f"{source}: models: {entry.id}: chat_template needs a tokenizer to count with")
        models[entry.id] = ModelSpec(
            id=entry.id,
            type=entry.type,
            upstreams=tuple(entry.upstreams),
            upstream_api_key_env=entry.upstream_api_key_env,
            timeout_seconds=entry.timeout_seconds,
            context_length=entry.context_length,
            tokenizer=_file(source, entry.id, "tokenizer", entry.tokenizer, base),
            chat_template=_file(source, entry.id, "chat_template", entry.chat_template, base),
            upstream_model=entry.upstream_model,
            created=_unix(entry.created, created),
        )
    sim = parsed.simulator
    return Config(
        models=models,
        simulator=SimulatorSpec(sim.host, sim.port, sim.tokens_per_second) if sim else None,
        gateway=GatewaySpec(parsed.gateway.default_max_tokens, parsed.gateway.connect_timeout_seconds,
                            parsed.gateway.upstream_request_id),
        source=source,
    )


# Names of this machine: an upstream at one of them reaches a simulator bound to another (or to all).
_LOCAL = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"})  # noqa: S104 - names compared, not bound


def with_simulator_port(config: Config, port: int | None) -> Config:
    """``config`` with its simulator moved to ``port`` (``serve --simulator-port``), and the upstreams that
    pointed at the simulator's old address pointing at the new one, so its models follow it."""
    sim = config.simulator
    if port is None or (sim is not None and port == sim.port):
        return config
    if sim is None:
        raise ConfigError(f"{config.source}: --simulator-port {port}: the configuration has no [simulator] to move")

    def moved(url: str) -> str:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port != sim.port or not (host == sim.host or (host in _LOCAL and sim.host in _LOCAL)):
            return url
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return urlunsplit(parts._replace(netloc=netloc))

    models = {mid: replace(spec, upstreams=tuple(moved(u) for u in spec.upstreams))
              for mid, spec in config.models.items()}
    return replace(config, simulator=replace(sim, port=port), models=models)
