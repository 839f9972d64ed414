"""The format of secrets: inference keys (``qgk_``) and console access tokens (``qgt_``).

A secret is ``<kind>_<32 base62 characters of randomness><6 base62 characters of CRC32>``:
32 base62 characters carry 190 random bits (the contract asks for at least 160), and the checksum lets
the gateway refuse a mistyped or made-up secret before it looks anything up (GitHub's token format
does the same). Only a SHA-256 digest of a secret is ever stored: a fast hash is right here because a
190-bit random secret cannot be guessed from its digest, and a fast hash keeps the hot path cheap and
needs no server-side pepper to keep in step across instances.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_CHARS = 32
CHECKSUM_CHARS = 6

INFERENCE_KEY_KIND = "qgk"
ACCESS_TOKEN_KIND = "qgt"  # noqa: S105 - a prefix, not a password
SECRET_LENGTH = len(INFERENCE_KEY_KIND) + 1 + RANDOM_CHARS + CHECKSUM_CHARS
# How much of a secret the masked prefix shows: the kind and 4 characters (about 24 bits),
# enough to tell keys apart at a glance, far too little to use one.
VISIBLE_CHARS = 4


def _base62(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        out.append(ALPHABET[rem])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_CHARS)


def generate(kind: str) -> str:
    """A new secret of ``kind`` (``qgk`` or ``qgt``)."""
    body = "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS))
    return f"{kind}_{body}{_checksum(body)}"


def is_well_formed(secret: str, kind: str) -> bool:
    """True if ``secret`` has the prefix, length, alphabet and checksum of a ``kind`` secret.

    Pure computation, no lookup: the gateway calls this before it touches any cache or store.
    """
    if len(secret) != SECRET_LENGTH or not secret.startswith(kind) or secret[len(kind)] != "_":
        return False
    payload = secret[len(kind) + 1 :]
    body, check = payload[:RANDOM_CHARS], payload[RANDOM_CHARS:]
    if not (payload.isascii() and payload.isalnum()):  # exactly ALPHABET, tested in C (hot path)
        return False
    return secrets.compare_digest(_checksum(body), check)


def hash_secret(secret: str) -> str:
    """The hex SHA-256 digest stored in place of the secret."""
    return hashlib.sha256(secret.encode("ascii", "replace")).hexdigest()


def masked_prefix(secret: str) -> str:
    """What the API shows after minting, e.g. ``qgk_8fK2…``."""
    return secret[: len(INFERENCE_KEY_KIND) + 1 + VISIBLE_CHARS] + "…"
