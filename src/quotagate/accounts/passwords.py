"""Password hashing with argon2id (argon2-cffi's defaults follow RFC 9106's recommendation)."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_LENGTH = 8
MAX_LENGTH = 1024


class Passwords:
    def __init__(self) -> None:
        self._hasher = PasswordHasher()
        # Verified against when the user does not exist, so that timing does not reveal which emails exist.
        self._dummy = self._hasher.hash("not-a-real-password")

    def hash(self, password: str) -> str:
        return str(self._hasher.hash(password))

    def verify(self, stored: str | None, password: str) -> bool:
        try:
            return bool(self._hasher.verify(stored or self._dummy, password)) and stored is not None
        except (VerificationError, InvalidHashError):
            return False
