"""API keys and scopes: a key is 256 random bits shown once; only its SHA-256 digest is kept
(a key that random needs no slow hash), and `admin` allows everything."""

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

KEY_PREFIX = "wk_"  # lets secret scanners find a leaked key
KEY_PATTERN = re.compile(r"wk_[A-Za-z0-9_-]{43}")


class Scope(StrEnum):
    WALLET_READ = "wallet:read"
    WALLET_CREDIT = "wallet:credit"
    WALLET_DEBIT = "wallet:debit"
    WALLET_REFUND = "wallet:refund"
    USERS_WRITE = "users:write"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    label: str
    scopes: frozenset[Scope]
    reads_per_second: int  # 0: unlimited
    writes_per_second: int
    created_at: datetime
    revoked_at: datetime | None = None

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes


def new_secret() -> str:
    """A fresh key: the prefix and 43 URL-safe base64 characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """What is stored of a key, and what a presented key is looked up by."""
    return hashlib.sha256(secret.encode()).hexdigest()
