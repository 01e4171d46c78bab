"""Per-key budgets of reads (GET) and writes (everything else), kept by the `limits` library:
in each process's memory, or in Redis so every worker and instance shares one budget. A budget
of N per second allows bursts of 2N: it is counted as 2N per sliding window of 2 seconds."""

import math
import time
from dataclasses import dataclass
from typing import Literal

import structlog
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

Budget = Literal["reads", "writes"]
WINDOW_S = 2
log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Verdict:
    is_allowed: bool
    budget: Budget
    quota: int  # per window
    remaining: int
    reset_s: int  # until the window frees capacity

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The IETF HTTPAPI draft's RateLimit-Policy and RateLimit fields (and Retry-After on a
        refusal)."""
        fields = [
            (b"ratelimit-policy", f'"{self.budget}";q={self.quota};w={WINDOW_S}'.encode()),
            (b"ratelimit", f'"{self.budget}";r={self.remaining};t={self.reset_s}'.encode()),
        ]
        if not self.is_allowed:
            fields.append((b"retry-after", str(max(1, self.reset_s)).encode()))
        return fields


class RateLimits:
    def __init__(self, redis_url: str | None) -> None:
        storage: Storage = (
            RedisStorage(
                f"async+{redis_url}",
                implementation="redispy",
                socket_timeout=1.0,
                socket_connect_timeout=1.0,
            )
            if redis_url
            else MemoryStorage()
        )
        self.limiter = SlidingWindowCounterRateLimiter(storage)

    async def spend(self, *, key_id: str, budget: Budget, per_second: int) -> Verdict | None:
        """Take one request from the key's budget; None when the budget is unlimited, or when
        Redis cannot be reached (limits fail open: the ledger does not stop for them)."""
        if per_second == 0:
            return None
        item = RateLimitItemPerSecond(2 * per_second, WINDOW_S)
        try:
            is_allowed = await self.limiter.hit(item, key_id, budget)
            stats = await self.limiter.get_window_stats(item, key_id, budget)
        except Exception as error:
            log.warning("rate limit storage unavailable", error=repr(error))
            return None
        return Verdict(
            is_allowed=is_allowed,
            budget=budget,
            quota=item.amount,
            remaining=stats.remaining,
            reset_s=max(0, math.ceil(stats.reset_time - time.time())),
        )
