"""The daily purge against Azurite: expired keys, operations, results and journal entries go; the rest stays."""

from __future__ import annotations

import uuid

from shared.idempotency import IdempotencyKey, IdempotencyStore, KeyKind
from shared.ledger import AcceptPlan, ChunkResult, Ledger
from shared.storage import Tables


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_purge_removes_only_what_expired(tables: Tables) -> None:
    clock = Clock(1_000_000.0)
    ledger = Ledger(tables.operations, clock=clock)
    keys = IdempotencyStore(tables.keys, explicit_ttl=100, derived_ttl=10, claim_lease=5, clock=clock)
    old_op = str(uuid.uuid4())
    await keys.claim(IdempotencyKey(KeyKind.EXPLICIT, "old"), "d1", old_op)
    _, (old_chunk,) = await ledger.accept(
        AcceptPlan(old_op, "http", {}, [(("a1",), {"status": "New"})], "d1")
    )
    await ledger.finish(old_chunk, ChunkResult.SUCCEEDED, 200, None)

    clock.now += 150  # the old key and operation are past the 100 s TTL, the new ones are not
    new_op = str(uuid.uuid4())
    await keys.claim(IdempotencyKey(KeyKind.EXPLICIT, "new"), "d2", new_op)
    _, (pending,) = await ledger.accept(AcceptPlan(new_op, "http", {}, [(("a2",), {"status": "New"})], "d2"))

    assert await keys.purge(clock.now) == 1
    removed = await ledger.purge(operations_before=clock.now - 100, journal_before=clock.now - 10)
    assert removed == 3  # the old operation, its result and its journal entry
    assert await ledger.operation(old_op) is None
    new = await ledger.operation(new_op)
    assert new is not None
    assert [c.chunk_id for c in await ledger.chunks_of(new)] == [pending.chunk_id]
    assert await keys.get(IdempotencyKey(KeyKind.EXPLICIT, "old")) is None
    assert await keys.get(IdempotencyKey(KeyKind.EXPLICIT, "new")) is not None
