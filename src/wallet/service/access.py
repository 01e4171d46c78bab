"""API keys: creating, listing and revoking them, and authenticating a presented key through a
short in-process cache, so a request pays microseconds for auth rather than a round trip while
a revocation still reaches every worker within CACHE_TTL_S."""

import asyncio
import time
from datetime import UTC, datetime

import uuid_utils

from wallet.domain.access import KEY_PATTERN, ApiKey, Scope, digest, new_secret
from wallet.domain.errors import Unauthenticated, UnknownKey
from wallet.service.wallet import Page, PageRequest
from wallet.store import queries
from wallet.store.database import Database

CACHE_TTL_S = 1.0  # revocation is seen within this (plus one look-up), under the 2 s promised
CACHE_MAX_ENTRIES = 10_000  # unknown keys are cached too; a flood of them must not grow it


class Access:
    """The keys of one database, and the cache of those presented to this process."""

    def __init__(
        self, database: Database, *, default_reads_per_second: int, default_writes_per_second: int
    ) -> None:
        self.database = database
        self.default_reads_per_second = default_reads_per_second
        self.default_writes_per_second = default_writes_per_second
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        # One look-up per key at a time: when an entry expires under load, the requests that
        # find it expired share one round trip instead of each making their own.
        self._looking_up: dict[str, asyncio.Future[tuple[float, ApiKey | None]]] = {}

    async def create_key(
        self,
        *,
        label: str,
        scopes: frozenset[Scope],
        reads_per_second: int | None = None,
        writes_per_second: int | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its secret, which is shown this once and never stored."""
        secret = new_secret()
        key = ApiKey(
            id=str(uuid_utils.uuid7()),
            label=label,
            scopes=scopes,
            reads_per_second=_or_default(reads_per_second, self.default_reads_per_second),
            writes_per_second=_or_default(writes_per_second, self.default_writes_per_second),
            created_at=datetime.now(UTC),
        )
        async with self.database.transaction(is_write=True) as connection:
            await queries.insert_api_key(connection, key, key_hash=digest(secret))
        return key, secret

    async def create_first_key(self) -> str | None:
        """An admin key's secret if the database has no key yet, else None."""
        async with self.database.transaction(is_write=False) as connection:
            if await queries.has_api_key(connection):
                return None
        _, secret = await self.create_key(label="first admin key", scopes=frozenset({Scope.ADMIN}))
        return secret

    async def keys(self, *, page: PageRequest) -> Page[ApiKey]:
        async with self.database.transaction(is_write=False) as connection:
            return await queries.list_api_keys(
                connection, limit=page.limit, before=page.before, offset=page.offset
            )

    async def revoke_key(self, *, key_id: str) -> None:
        async with self.database.transaction(is_write=True) as connection:
            if not await queries.revoke_api_key(connection, key_id, at=datetime.now(UTC)):
                raise UnknownKey(f"key {key_id} does not exist")
        # This process refuses it at once; the others once their cached copy expires.
        self._cache = {
            key_hash: entry
            for key_hash, entry in self._cache.items()
            if entry[1] is None or entry[1].id != key_id
        }

    async def authenticate(self, secret: str | None) -> ApiKey:
        """The live key `secret` names, or Unauthenticated. Keys are found by their digest, so
        how long a look-up takes says nothing about the secret."""
        if secret is None:
            raise Unauthenticated("an API key is required: Authorization: Bearer <key>")
        if KEY_PATTERN.fullmatch(secret) is None:
            raise Unauthenticated("the API key is not one this service issued")
        key_hash = digest(secret)
        cached = self._cache.get(key_hash)
        if cached is None or cached[0] <= time.monotonic():
            looking_up = self._looking_up.get(key_hash)
            if looking_up is None:
                looking_up = asyncio.ensure_future(self._look_up(key_hash))
                self._looking_up[key_hash] = looking_up
                looking_up.add_done_callback(lambda _: self._looking_up.pop(key_hash, None))
            # Shielded: a caller that gives up does not cancel the others' look-up.
            cached = await asyncio.shield(looking_up)
        key = cached[1]
        if key is None:
            raise Unauthenticated("the API key is not one this service issued")
        if key.revoked_at is not None:
            raise Unauthenticated("the API key was revoked")
        return key

    async def _look_up(self, key_hash: str) -> tuple[float, ApiKey | None]:
        started = time.monotonic()
        async with self.database.transaction(is_write=False) as connection:
            found = await queries.find_api_key(connection, key_hash)
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            self._cache.clear()
        self._cache[key_hash] = (started + CACHE_TTL_S, found)
        return self._cache[key_hash]


def _or_default(value: int | None, default: int) -> int:
    return default if value is None else value
