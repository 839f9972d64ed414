"""Secrets: their format and checksum, that malformed ones never reach the store, and that no secret
ever lands in the database or the server's log."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, MetaData, Table, event, inspect, select

from quotagate.accounts.models import Actor
from quotagate.accounts.passwords import Passwords
from quotagate.accounts.schemas import ProjectCreate
from quotagate.accounts.service import AccountService
from quotagate.errors import Unauthenticated
from quotagate.keys import secrets
from quotagate.keys.events import KeyEvents
from quotagate.keys.schemas import KeyCreate
from quotagate.keys.service import KeyService, project_keys_invalidator
from quotagate.store.engine import make_engine, migrate
from tests.console.test_keys import PRODUCT_PAGE_BODY
from tests.support import Gateway

KINDS = (secrets.INFERENCE_KEY_KIND, secrets.ACCESS_TOKEN_KIND)


@pytest.mark.parametrize("kind", KINDS)
def test_format_prefix_entropy_and_checksum(kind: str) -> None:
    made = {secrets.generate(kind) for _ in range(500)}
    assert len(made) == 500
    for secret in made:
        assert re.fullmatch(rf"{kind}_[0-9A-Za-z]{{{secrets.RANDOM_CHARS + secrets.CHECKSUM_CHARS}}}", secret)
        assert secrets.is_well_formed(secret, kind)
    assert secrets.RANDOM_CHARS * math.log2(len(secrets.ALPHABET)) >= 160
    # every character of the random part is used
    assert set("".join(s[4:4 + secrets.RANDOM_CHARS] for s in made)) == set(secrets.ALPHABET)


@pytest.mark.parametrize("kind", KINDS)
def test_every_one_character_typo_is_refused(kind: str) -> None:
    secret = secrets.generate(kind)
    for i in range(len(kind) + 1, len(secret)):
        for c in secrets.ALPHABET:
            if c != secret[i]:
                typo = secret[:i] + c + secret[i + 1:]
                assert not secrets.is_well_formed(typo, kind), typo
    for i in range(len(kind) + 1, len(secret) - 1):  # adjacent swaps
        if secret[i] != secret[i + 1]:
            swapped = secret[:i] + secret[i + 1] + secret[i] + secret[i + 2:]
            assert not secrets.is_well_formed(swapped, kind)


def test_malformed_secrets_are_refused() -> None:
    key = secrets.generate(secrets.INFERENCE_KEY_KIND)
    token = secrets.generate(secrets.ACCESS_TOKEN_KIND)
    for bad in ("", "qgk_", key[:-1], key + "A", key.upper(), " " + key, key.replace("qgk_", "qgx_"),
                key.replace("_", "-"), key[:8] + "…", key[:8], secrets.masked_prefix(key), token, "qgk" + "_" * 39,
                key[:-1] + "é", key[:-1] + "²", key[:-1] + "٣", "\x00" * len(key)):
        assert not secrets.is_well_formed(bad, secrets.INFERENCE_KEY_KIND), bad
    assert not secrets.is_well_formed(key, secrets.ACCESS_TOKEN_KIND)


def test_only_a_hash_is_kept() -> None:
    secret = secrets.generate(secrets.INFERENCE_KEY_KIND)
    digest = secrets.hash_secret(secret)
    assert digest == hashlib.sha256(secret.encode()).hexdigest() and secret not in digest
    prefix = secrets.masked_prefix(secret)
    assert prefix == secret[:8] + "…"  # 4 random characters: about 24 bits, far from the 190 of the secret


# -- no store lookup for a malformed secret (in-process, counting SQL statements) ----------------------

@pytest.fixture
def services(database_url: str) -> Iterator[tuple[Engine, AccountService, KeyService]]:
    url = database_url.replace("postgresql://", "postgresql+psycopg://")
    migrate(url)
    engine = make_engine(url)
    models = lambda: frozenset({"qwen3.6-27b", "bge-m3"})  # noqa: E731
    events = KeyEvents()
    accounts = AccountService(engine, Passwords(), models, project_keys_invalidator(events))
    keys = KeyService(engine, accounts, events, models)
    yield engine, accounts, keys
    engine.dispose()


class StatementCounter:
    def __init__(self, engine: Engine) -> None:
        self.statements: list[str] = []
        self._engine = engine

    def __enter__(self) -> StatementCounter:
        event.listen(self._engine, "before_cursor_execute", self._count)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self._engine, "before_cursor_execute", self._count)

    def _count(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.statements.append(statement)


def test_a_malformed_access_token_never_reaches_the_store(
        services: tuple[Engine, AccountService, KeyService]) -> None:
    engine, accounts, _keys = services
    user = accounts.create_user("sql@example.com")
    _token, real = accounts.create_token(user)
    for bad in (real[:-1], real[:10] + ("x" if real[10] != "x" else "y") + real[11:], "garbage",
                secrets.masked_prefix(real), secrets.generate(secrets.INFERENCE_KEY_KIND)):
        with StatementCounter(engine) as counter, pytest.raises(Unauthenticated):
            accounts.authenticate_token(bad)
        assert counter.statements == [], bad
    # the counter does see lookups: a well-formed but unknown token is looked up, and refused
    with StatementCounter(engine) as counter, pytest.raises(Unauthenticated):
        accounts.authenticate_token(secrets.generate(secrets.ACCESS_TOKEN_KIND))
    assert any("access_tokens" in s for s in counter.statements)
    assert accounts.authenticate_token(real)[0].id == user.id


def test_a_mistyped_inference_key_never_reaches_the_store(services: tuple[Engine, AccountService, KeyService]) -> None:
    engine, accounts, keys = services
    actor = Actor(user=accounts.create_user("keys@example.com"))
    project = accounts.create_project(actor, ProjectCreate(name="p"))
    key, secret = keys.mint(actor, project.id, KeyCreate(name="k"))
    typo = secret[:12] + ("Q" if secret[12] != "Q" else "R") + secret[13:]
    for bad in (typo, secret[:-1], key.prefix, key.prefix[:-1], secrets.generate(secrets.ACCESS_TOKEN_KIND)):
        with StatementCounter(engine) as counter:
            assert keys.lookup(bad) is None
        assert counter.statements == [], bad
    with StatementCounter(engine) as counter:
        found = keys.lookup(secret)
    assert found is not None and found.id == key.id and counter.statements
    with StatementCounter(engine) as counter:
        assert keys.lookup(secrets.generate(secrets.INFERENCE_KEY_KIND)) is None
    assert counter.statements


# -- after a whole lifecycle, no secret anywhere ---------------------------------------------------------

def _database_dump(database_url: str) -> bytes:
    """Every value of every table, as text (works for both stores)."""
    engine = make_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    out: list[str] = []
    try:
        with engine.connect() as conn:
            for table in inspect(conn).get_table_names():
                t = Table(table, MetaData(), autoload_with=conn)
                out.extend(repr(tuple(row)) for row in conn.execute(select(t)))
    finally:
        engine.dispose()
    return "\n".join(out).encode()


def test_no_secret_in_the_database_or_the_log(gateway_console: Gateway, database_url: str, tmp_path: Path) -> None:
    gw = gateway_console
    alice = gw.user("secret-alice@example.com", password="a long enough password")
    bob = gw.user("secret-bob@example.com")
    issued: list[str] = [alice.token, bob.token]
    pid = alice.project("secrets")["id"]
    r = alice.request("POST", f"/v1/projects/{pid}/inference/keys", content=PRODUCT_PAGE_BODY)
    assert r.status_code == 201
    first = r.json()
    issued.append(first["secret"])
    alice.ok("PATCH", f"/v1/inference/keys/{first['id']}", json={"rpm": 1, "name": "edited"})
    rotated = alice.ok("POST", f"/v1/inference/keys/{first['id']}/rotate", 201, json={"grace_period_seconds": 30})
    issued.append(rotated["secret"])
    again = alice.ok("POST", f"/v1/inference/keys/{rotated['id']}/rotate", 201, json={})
    issued.append(again["secret"])
    alice.ok("DELETE", f"/v1/inference/keys/{first['id']}")
    alice.ok("POST", f"/v1/inference/keys/{first['id']}/archive")
    alice.ok("POST", f"/v1/inference/keys/{first['id']}/unarchive")
    token = alice.ok("POST", "/v1/me/access-tokens", 201, json={"name": "extra"})
    issued.append(token["token"])
    alice.ok("DELETE", f"/v1/me/access-tokens/{token['id']}")
    alice.ok("POST", f"/v1/projects/{pid}/members", 201, json={"email": "secret-bob@example.com", "role": "viewer"})
    bob.join(pid)
    bob.request("POST", f"/v1/projects/{pid}/inference/keys", json={"name": "nope"})  # 403
    # refused requests that carry secrets: a typo of a real token, a key used as a token
    for bad in (alice.token[:-1] + "x", first["secret"], rotated["secret"]):
        httpx.get(f"{gw.console_url}/v1/projects", headers={"Authorization": f"Bearer {bad}"})
    gw.stop()

    blobs: dict[str, bytes] = {"database rows": _database_dump(database_url), "server log": gw.log_path.read_bytes()}
    data_dir = Path(gw.env["QUOTAGATE_DATA_DIR"])
    for path in data_dir.rglob("*"):
        if path.is_file():
            blobs[str(path)] = path.read_bytes()
    if database_url.startswith("sqlite"):
        assert any(name.endswith("quotagate.db") for name in blobs)
    assert len(issued) == 6 and len(set(issued)) == 6
    for secret in issued:
        body = secret[4:].encode()
        for name, blob in blobs.items():
            assert body not in blob, f"a secret's body is in {name}"
            assert secret.encode() not in blob
    # what is kept instead: the hashes (which proves the dump is the real content)
    dump = blobs["database rows"]
    assert secrets.hash_secret(first["secret"]).encode() in dump
    assert secrets.hash_secret(alice.token).encode() in dump
    assert b"a long enough password" not in b"".join(blobs.values())
