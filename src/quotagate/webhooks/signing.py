"""Webhook secrets and signatures.

Signing needs the secret itself (an HMAC cannot be computed from a hash of its key), so the store must be
able to produce it, yet a copy of the database alone should not let anyone forge our deliveries. So the
secret is not stored at all: it is *derived*, ``HMAC-SHA256(signing key, webhook id, nonce)``, from a
signing key that lives outside the database (``QUOTAGATE_WEBHOOK_SIGNING_KEY``, or a file generated in
the data dir) and a random nonce stored with the webhook. Rotating a webhook's secret is a new nonce.
Compared with storing the secret encrypted: the same protection (both need a key kept off the database),
no ciphertext to manage and no cipher dependency.

Each webhook also stores the fingerprint of the signing key its secret came from; an instance delivers
only to webhooks whose fingerprint is its own, so instances configured with different keys never send
a signature the receiver cannot verify (docs/webhooks.md: set the same key on every instance).

A delivery carries ``quotagate-signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
KEY_FILE = "webhook-signing.key"
TOLERANCE = 300  # seconds a receiver should accept a signature's timestamp either way (docs/webhooks.md)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """The instance's webhook signing key (never logged, never stored in the database)."""

    key: bytes

    def __repr__(self) -> str:
        return f"SigningKey(fingerprint={self.fingerprint!r})"

    @property
    def fingerprint(self) -> str:
        return hmac.new(self.key, b"quotagate webhook signing key fingerprint", hashlib.sha256).hexdigest()[:16]

    def secret(self, webhook_id: str, nonce: str) -> str:
        """The webhook's signing secret, the same on every instance that holds this key."""
        mac = hmac.new(self.key, f"quotagate webhook secret\0{webhook_id}\0{nonce}".encode(), hashlib.sha256)
        return SECRET_PREFIX + base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def load_signing_key(configured: str | None, data_dir: Path) -> SigningKey:
    """The configured key, else the one in ``<data_dir>/webhook-signing.key`` (made, 0600, if missing).

    The file is written under a temporary name and linked into place, so that processes starting together
    on one data dir all end up reading the same key."""
    if configured:
        return SigningKey(configured.encode())
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = data_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, secrets.token_urlsafe(48).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # the first process to get here wins; the others read its key
        finally:
            tmp.unlink()
    return SigningKey(path.read_bytes().strip())


def new_nonce() -> str:
    return secrets.token_hex(16)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``quotagate-signature`` header's value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, tolerance: int = TOLERANCE, now: float | None = None) -> bool:
    """What a receiver does (docs/webhooks.md has the same in a standalone form): the header's timestamp is
    recent and one of its ``v1`` signatures is the HMAC of ``"<t>.<body>"`` with the secret."""
    fields = [part.partition("=") for part in header.split(",")]
    stamps = [v for k, _, v in fields if k.strip() == "t"]
    candidates = [v.strip() for k, _, v in fields if k.strip() == "v1"]
    if len(stamps) != 1 or not stamps[0].strip().isdigit() or not candidates:
        return False
    t = int(stamps[0])
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    expected = hmac.new(secret.encode(), b"%d." % t + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, c) for c in candidates)
