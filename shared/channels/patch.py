"""The PATCH channel: `PATCH /api/alerts/{id}`, one alert per call (docs/mde-api.md §5, §8).

MDE documents this API with limits of its own (100 calls a minute, 1,500 an hour against batchUpdate's
10 and 500), so it is a second way out when batchUpdate's budget is spent (docs/contracts.md §7). What
it needs and batchUpdate does not: the alert in the URL instead of an `alertIds` list, its own budget
row, and no batch limit to learn (one alert is all a call may carry). It answers 200 with the alert and
404 for an unknown alert; every answer is classified by the shared rules.

Whether MDE counts the two APIs apart is not documented: each has its own limiter here, and a 429 that
this channel's budget did not predict is logged as a warning (shared.sender).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote

from shared.channels.base import CallResult, Transport, classify
from shared.validation import outbound_body

if TYPE_CHECKING:
    from shared.ratelimit import RateLimiter

BUDGET_ROW_KEY = "patch-calls"


class PatchChannel:
    """One tenant's single-alert update API: its URL, body and budget."""

    name = "patch"

    def __init__(
        self, transport: Transport, alerts_url: str, limiter: RateLimiter, enum_overrides: Mapping[str, str]
    ) -> None:
        self.transport = transport
        self.alerts_url = alerts_url.rstrip("/")
        self.limiter = limiter
        self._overrides = enum_overrides

    async def max_alerts(self) -> int:
        return 1

    async def learn_limit(self, result: CallResult, attempted: int) -> int | None:
        return None  # nothing smaller than one alert to split to

    async def send(self, alert_ids: tuple[str, ...], fields: Mapping[str, str], token: str) -> CallResult:
        if len(alert_ids) != 1:
            raise ValueError(f"a PATCH call carries exactly one alert, not {len(alert_ids)}")
        body = outbound_body((), fields, self._overrides)
        del body["alertIds"]
        url = f"{self.alerts_url}/{quote(alert_ids[0], safe='')}"
        return await self.transport.call("PATCH", url, body, token, classify)
