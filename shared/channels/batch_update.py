"""The batchUpdate channel: `POST /api/alerts/batchUpdate`, many alerts in one call (docs/mde-api.md §1).

What this API needs and no other: its URL and body, its answer classification (a 400
`MaximumBatchSizeExceeded` says how many ids MDE allows), its own budget row, and its split policy: the
most ids per call, the setting lowered for good when MDE reports a smaller allowance.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from shared.channels.base import CallKind, CallResult, Transport, classify, parse_error_body
from shared.errors import StateContention
from shared.validation import outbound_body

if TYPE_CHECKING:
    from shared.ratelimit import RateLimiter
    from shared.storage import StateStore

log = logging.getLogger(__name__)

_ALLOWED_BATCH = re.compile(r"allowed:\s*(\d+)", re.IGNORECASE)
BUDGET_ROW_KEY = "calls"


def classify_batch_update(status: int, retry_after_header: str | None, text: str) -> CallResult:
    """batchUpdate's answer → what it means: MaximumBatchSizeExceeded first, then the shared rules."""
    if status == 400:
        error = parse_error_body(status, text)
        if error.code == "MaximumBatchSizeExceeded":
            match = _ALLOWED_BATCH.search(error.message)
            allowed = int(match.group(1)) if match and int(match.group(1)) >= 1 else None
            return CallResult(CallKind.BATCH_TOO_LARGE, error, allowed_batch_size=allowed)
    return classify(status, retry_after_header, text)


class BatchLimit:
    """The most ids per call: the setting, lowered for good when MDE reports a smaller allowance.

    The learned value lives in the Budget table so that every instance uses it (docs/contracts.md §3); each process
    keeps a copy and re-reads it at most every `refresh_seconds`.
    """

    ROW_KEY = "batch-limit"

    def __init__(
        self,
        configured: int,
        table: StateStore | None = None,
        refresh_seconds: float = 30.0,
        partition_key: str = "mde",
    ) -> None:
        self.configured = configured
        self.row = (partition_key, self.ROW_KEY)
        self.learned: int | None = None
        self._table = table
        self._refresh = refresh_seconds
        self._read_at = float("-inf")

    @property
    def current(self) -> int:
        return min(self.configured, self.learned) if self.learned else self.configured

    async def refresh(self) -> int:
        """The current limit, re-read from the table when the local copy is old."""
        if self._table is None or time.monotonic() - self._read_at < self._refresh:
            return self.current
        entity = await self._table.get(*self.row)
        if entity is not None:
            self._remember(int(entity["Allowed"]))
        self._read_at = time.monotonic()
        return self.current

    def _remember(self, allowed: int) -> None:
        self.learned = min(self.learned, allowed) if self.learned else allowed

    async def learn(self, allowed: int | None, attempted: int) -> int:
        """Remember MDE's allowance (or half the refused size when MDE did not say); return the new limit."""
        new = allowed if allowed is not None else max(1, attempted // 2)
        new = max(1, min(new, attempted - 1)) if attempted > 1 else 1
        self._remember(new)
        log.warning("MDE allows at most %d alert ids per call; using that from now on", self.current)
        if self._table is not None:
            await self._store(self.current)
        return self.current

    async def _store(self, allowed: int) -> None:
        """Lower the stored limit to `allowed` unless it is lower already (another instance learned more)."""
        assert self._table is not None
        pk, rk = self.row
        for _ in range(10):
            entity = await self._table.get(pk, rk)
            if entity is None:
                if (
                    await self._table.insert({"PartitionKey": pk, "RowKey": rk, "Allowed": allowed})
                    is not None
                ):
                    return
                continue
            if int(entity["Allowed"]) <= allowed:
                self._remember(int(entity["Allowed"]))
                return
            new = {"PartitionKey": pk, "RowKey": rk, "Allowed": allowed}
            if await self._table.replace(new, str(entity.metadata["etag"])) is not None:
                return
        raise StateContention(f"the learned batch limit {pk}/{rk} kept changing under ten writes")


class BatchUpdateChannel:
    """One tenant's batchUpdate API: where it is, what its body looks like, its budget and its limit."""

    name = "batchUpdate"

    def __init__(
        self,
        transport: Transport,
        url: str,
        limiter: RateLimiter,
        batch_limit: BatchLimit,
        enum_overrides: Mapping[str, str],
    ) -> None:
        self.transport = transport
        self.url = url
        self.limiter = limiter
        self.batch_limit = batch_limit
        self._overrides = enum_overrides

    async def max_alerts(self) -> int:
        """The most ids one call may carry now (the split policy's bound)."""
        return await self.batch_limit.refresh()

    async def learn_limit(self, result: CallResult, attempted: int) -> int | None:
        """After MaximumBatchSizeExceeded: the size to split to, remembered by every instance; None when a
        single id was refused (nothing smaller to try: the chunk fails)."""
        if result.kind is not CallKind.BATCH_TOO_LARGE or attempted <= 1:
            return None
        return await self.batch_limit.learn(result.allowed_batch_size, attempted)

    async def send(self, alert_ids: tuple[str, ...], fields: Mapping[str, str], token: str) -> CallResult:
        body = outbound_body(alert_ids, fields, self._overrides)
        return await self.transport.call("POST", self.url, body, token, classify_batch_update)
