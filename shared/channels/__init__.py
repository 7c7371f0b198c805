"""The upstream seam: one channel per MDE API, each owning what that API needs.

A channel holds its URL and body builder, its answer classification, its budget (a RateLimiter on its
own row) and its split policy. The sender asks a channel for those and never knows which API it talks
to, so a second API (the single-alert PATCH of docs/contracts.md §7) is a new module here registered
with the tenant (shared.tenants), not edits all over the sender.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shared.channels.base import CallResult
    from shared.ratelimit import RateLimiter


class Channel(Protocol):
    """What the sender needs from one MDE API."""

    name: str
    limiter: RateLimiter  # the channel's own share of MDE's limits, shared by every instance

    async def max_alerts(self) -> int:
        """The most alert ids one call may carry now."""
        ...

    async def learn_limit(self, result: CallResult, attempted: int) -> int | None:
        """What a refusal for size teaches: the size to split to, or None when splitting cannot help."""
        ...

    async def send(self, alert_ids: tuple[str, ...], fields: Mapping[str, str], token: str) -> CallResult:
        """One call, classified; never raises, never retries."""
        ...
