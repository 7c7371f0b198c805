"""The Table Storage tables alertgate keeps its shared state in, created once per worker process.

- `<prefix>Keys`: idempotency keys (shared.idempotency).
- `<prefix>Operations`: the operations ledger (shared.ledger): one partition holding the accept counter,
  operations, pending chunks (the outbox), chunk results and the accept journal, so that every change that
  must be atomic is one entity-group transaction.
- `<prefix>Budget`: the shared call budget (shared.ratelimit) and the learned batch limit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from azure.data.tables.aio import TableClient, TableServiceClient


@dataclass
class Tables:
    keys: TableClient
    operations: TableClient
    budget: TableClient

    @classmethod
    def from_service(cls, service: TableServiceClient, prefix: str) -> Tables:
        return cls(
            keys=service.get_table_client(f"{prefix}Keys"),
            operations=service.get_table_client(f"{prefix}Operations"),
            budget=service.get_table_client(f"{prefix}Budget"),
        )

    def all(self) -> list[TableClient]:
        return [self.keys, self.operations, self.budget]

    async def ensure_exist(self, service: TableServiceClient) -> None:
        """Create the tables if missing (infra creates them in Azure; Azurite starts empty)."""
        await asyncio.gather(*(service.create_table_if_not_exists(t.table_name) for t in self.all()))

    async def close(self) -> None:
        await asyncio.gather(*(t.close() for t in self.all()))
