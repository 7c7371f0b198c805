"""Idempotency keys (shared.idempotency) over MemoryTable: claim and what an existing record means,
takeover of a stale or expired claim, completion, release and purge."""

from __future__ import annotations

import hashlib

import pytest

from shared.errors import StateContention
from shared.idempotency import (
    ROW_KEY,
    ClaimOutcome,
    IdempotencyKey,
    IdempotencyStore,
    KeyKind,
    KeyRecord,
    KeyState,
    StoredResponse,
)
from shared.storage import Entity
from tests.fakes import MemoryTable

T0 = 1_700_000_000.0
EXPLICIT_TTL, DERIVED_TTL, LEASE = 86_400.0, 600.0, 30.0
RESPONSE = StoredResponse(
    202, {"Location": "/operations/op-1", "Content-Type": "application/json"}, '{"id":"op-1"}'
)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rig(table: MemoryTable | None = None, key_space: str = "") -> tuple[IdempotencyStore, MemoryTable, Clock]:
    table, clock = table or MemoryTable("alertgateKeys"), Clock()
    store = IdempotencyStore(
        table,
        explicit_ttl=EXPLICIT_TTL,
        derived_ttl=DERIVED_TTL,
        claim_lease=LEASE,
        clock=clock,
        key_space=key_space,
    )
    return store, table, clock


def stored(table: MemoryTable, key: IdempotencyKey) -> KeyRecord:
    entity = table.peek(key.partition_key, ROW_KEY)
    assert entity is not None
    return KeyRecord.from_entity(key, entity)


# --- keys -------------------------------------------------------------------------------------------------


def test_partition_keys_by_kind_and_key_space() -> None:
    home = IdempotencyKey(KeyKind.EXPLICIT, "key-1")
    derived = IdempotencyKey(KeyKind.DERIVED, "key-1")
    tenant = IdempotencyKey(KeyKind.EXPLICIT, "key-1", "tenant-b")

    assert home.partition_key == "k-" + hashlib.sha256(b"key-1").hexdigest()  # as before tenants existed
    assert derived.partition_key == "d-" + hashlib.sha256(b"key-1").hexdigest()
    assert tenant.partition_key == "k-" + hashlib.sha256(b"tenant-b\x00key-1").hexdigest()
    assert len({home.partition_key, derived.partition_key, tenant.partition_key}) == 3


def test_a_stored_response_round_trips() -> None:
    assert StoredResponse.loads(RESPONSE.dumps()) == RESPONSE


# --- claim ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "ttl"), [(KeyKind.EXPLICIT, EXPLICIT_TTL), (KeyKind.DERIVED, DERIVED_TTL)])
async def test_a_new_key_is_claimed_in_progress_with_its_ttl(kind: KeyKind, ttl: float) -> None:
    store, table, _ = rig()
    key = store.key(kind, "key-1")

    claim = await store.claim(key, "digest-A", "op-1")

    assert claim.outcome is ClaimOutcome.CLAIMED
    record = stored(table, key)
    assert (record.state, record.digest, record.operation_id) == (KeyState.IN_PROGRESS, "digest-A", "op-1")
    assert (record.claimed_at, record.expires_at) == (T0, T0 + ttl)
    assert claim.record.etag == record.etag is not None


async def test_the_same_request_while_in_progress_is_in_progress() -> None:
    store, _, clock = rig()
    key = store.key(KeyKind.EXPLICIT, "key-1")
    await store.claim(key, "digest-A", "op-1")
    clock.now += LEASE  # not yet past the lease

    claim = await store.claim(key, "digest-A", "op-2")

    assert claim.outcome is ClaimOutcome.IN_PROGRESS
    assert claim.record.operation_id == "op-1"


async def test_the_same_key_with_another_body_is_a_mismatch() -> None:
    store, table, _ = rig()
    key = store.key(KeyKind.EXPLICIT, "key-1")
    await store.claim(key, "digest-A", "op-1")

    claim = await store.claim(key, "digest-B", "op-2")

    assert claim.outcome is ClaimOutcome.MISMATCH
    assert stored(table, key).digest == "digest-A"


async def test_a_completed_key_replays_its_response() -> None:
    store, _, _ = rig()
    key = store.key(KeyKind.EXPLICIT, "key-1")
    claim = await store.claim(key, "digest-A", "op-1")
    await store.complete(claim.record, RESPONSE)

    replay = await store.claim(key, "digest-A", "op-2")
    mismatch = await store.claim(key, "digest-B", "op-3")

    assert replay.outcome is ClaimOutcome.REPLAY
    assert replay.record.response == RESPONSE and replay.record.operation_id == "op-1"
    assert mismatch.outcome is ClaimOutcome.MISMATCH


async def test_a_claim_older_than_the_lease_is_stale() -> None:
    store, _, clock = rig()
    key = store.key(KeyKind.EXPLICIT, "key-1")
    await store.claim(key, "digest-A", "op-1")
    clock.now += LEASE + 0.001

    claim = await store.claim(key, "digest-A", "op-2")

    assert claim.outcome is ClaimOutcome.STALE
    assert claim.record.operation_id == "op-1"


async def test_an_expired_record_is_claimed_anew() -> None:
    store, table, clock = rig()
    key = store.key(KeyKind.DERIVED, "digest-A")
    first = await store.claim(key, "digest-A", "op-1")
    await store.complete(first.record, RESPONSE)
    clock.now += DERIVED_TTL

    claim = await store.claim(key, "digest-A", "op-2")

    assert claim.outcome is ClaimOutcome.CLAIMED
    record = stored(table, key)
    assert (record.state, record.operation_id, record.response) == (KeyState.IN_PROGRESS, "op-2", None)
    assert record.expires_at == clock.now + DERIVED_TTL
    assert claim.record.etag == record.etag


async def test_key_spaces_do_not_share_records() -> None:
    table = MemoryTable()
    home, _, _ = rig(table)
    tenant, _, _ = rig(table, key_space="tenant-b")

    await home.claim(home.key(KeyKind.EXPLICIT, "key-1"), "digest-A", "op-1")
    claim = await tenant.claim(tenant.key(KeyKind.EXPLICIT, "key-1"), "digest-B", "op-2")

    assert claim.outcome is ClaimOutcome.CLAIMED
    assert table.size() == 2


class VanishingTable(MemoryTable):
    """The record is purged between the claim's failed insert and its read, `times` times."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times

    async def insert(self, entity: Entity) -> str | None:
        etag = await super().insert(entity)
        if etag is None and self.times > 0:
            self.times -= 1
            await self.delete(entity["PartitionKey"], entity["RowKey"])
        return etag


async def test_a_record_purged_between_insert_and_read_is_claimed_on_the_next_try() -> None:
    store, table, _ = rig(VanishingTable(times=1))
    key = store.key(KeyKind.EXPLICIT, "key-1")
    table.put({"PartitionKey": key.partition_key, "RowKey": ROW_KEY, "State": "InProgress"})

    claim = await store.claim(key, "digest-A", "op-1")

    assert claim.outcome is ClaimOutcome.CLAIMED
    assert stored(table, key).operation_id == "op-1"
    assert table.calls["insert"] == 2


class Flickering(MemoryTable):
    """Every insert meets a record, and every read finds it gone."""

    async def insert(self, entity: Entity) -> str | None:
        await super().insert(entity)
        await self.delete(entity["PartitionKey"], entity["RowKey"])
        return None


async def test_a_key_that_keeps_appearing_and_vanishing_is_contention() -> None:
    store, table, _ = rig(Flickering())

    with pytest.raises(StateContention):
        await store.claim(store.key(KeyKind.EXPLICIT, "key-1"), "digest-A", "op-1")
    assert table.calls["insert"] == 5


# --- changing a record ------------------------------------------------------------------------------------


async def test_replace_takes_the_key_over_only_if_unchanged() -> None:
    store, table, clock = rig()
    key = store.key(KeyKind.EXPLICIT, "key-1")
    old = (await store.claim(key, "digest-A", "op-1")).record
    clock.now += 10

    new = await store.replace(old, "digest-B", "op-2")

    assert new is not None
    record = stored(table, key)
    assert (record.digest, record.operation_id, record.claimed_at, record.etag) == (
        "digest-B",
        "op-2",
        clock.now,
        new.etag,
    )
    assert await store.replace(old, "digest-C", "op-3") is None
    assert stored(table, key).operation_id == "op-2"


async def test_take_over_renews_a_stale_claim_for_the_same_operation() -> None:
    store, table, clock = rig()
    key = store.key(KeyKind.EXPLICIT, "key-1")
    await store.claim(key, "digest-A", "op-1")
    clock.now += LEASE + 1
    stale = (await store.claim(key, "digest-A", "op-2")).record

    renewed = await store.take_over(stale)

    assert renewed is not None
    record = stored(table, key)
    assert (record.operation_id, record.claimed_at, record.expires_at) == (
        "op-1",
        clock.now,
        stale.expires_at,
    )
    assert record.state is KeyState.IN_PROGRESS and record.etag == renewed.etag
    assert await store.take_over(stale) is None  # a second taker finds it changed
    assert (await store.claim(key, "digest-A", "op-3")).outcome is ClaimOutcome.IN_PROGRESS


async def test_complete_stores_the_first_response_once() -> None:
    store, table, _ = rig()
    key = store.key(KeyKind.EXPLICIT, "key-1")
    claimed = (await store.claim(key, "digest-A", "op-1")).record

    done = await store.complete(claimed, RESPONSE)

    assert done is not None
    record = stored(table, key)
    assert (record.state, record.response, record.operation_id) == (KeyState.COMPLETED, RESPONSE, "op-1")
    assert (record.claimed_at, record.expires_at) == (claimed.claimed_at, claimed.expires_at)
    assert await store.complete(claimed, StoredResponse(500, {}, "")) is None  # changed since claimed
    assert stored(table, key).response == RESPONSE


async def test_complete_after_a_takeover_is_none() -> None:
    store, _, clock = rig()
    key = store.key(KeyKind.EXPLICIT, "key-1")
    mine = (await store.claim(key, "digest-A", "op-1")).record
    clock.now += LEASE + 1
    stale = (await store.claim(key, "digest-A", "op-1")).record
    await store.take_over(stale)

    assert await store.complete(mine, RESPONSE) is None


async def test_release_drops_an_unchanged_claim() -> None:
    store, table, _ = rig()
    key = store.key(KeyKind.EXPLICIT, "key-1")
    claimed = (await store.claim(key, "digest-A", "op-1")).record

    await store.release(claimed)

    assert table.peek(key.partition_key, ROW_KEY) is None
    assert (await store.claim(key, "digest-A", "op-2")).outcome is ClaimOutcome.CLAIMED


async def test_release_leaves_a_changed_record_to_whoever_changed_it() -> None:
    store, table, clock = rig()
    key = store.key(KeyKind.EXPLICIT, "key-1")
    mine = (await store.claim(key, "digest-A", "op-1")).record
    clock.now += LEASE + 1
    stale = (await store.claim(key, "digest-A", "op-1")).record
    theirs = await store.take_over(stale)

    await store.release(mine)

    assert theirs is not None
    assert stored(table, key).etag == theirs.etag


async def test_purge_deletes_expired_records_only() -> None:
    store, table, clock = rig()
    derived = store.key(KeyKind.DERIVED, "d1")
    explicit = store.key(KeyKind.EXPLICIT, "e1")
    await store.claim(derived, "d1", "op-1")
    await store.claim(explicit, "e1", "op-2")

    assert await store.purge(T0 + DERIVED_TTL) == 0  # "lt": expiring exactly now is kept
    assert await store.purge(T0 + DERIVED_TTL + 1) == 1

    assert table.peek(derived.partition_key, ROW_KEY) is None
    assert table.peek(explicit.partition_key, ROW_KEY) is not None
    clock.now += EXPLICIT_TTL + 1
    assert await store.purge(clock.now) == 1
    assert table.size() == 0
