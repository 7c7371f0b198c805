"""Idempotency keys in Table Storage, with the IETF `Idempotency-Key` semantics of docs/contracts.md §1.

Modelled on AWS Lambda Powertools' idempotency utility: a record with explicit states behind a small
store interface. A key is claimed with one atomic insert (a 409 means someone holds it); the record
carries the operation id from the start, so the claim and the ledger's acceptance agree on which
operation a key stands for, and a stale claim can be taken over with an ETag-conditioned update without
ever accepting the request twice (see shared.ledger).

States:
    InProgress   claimed; the request may or may not have been accepted yet (the ledger knows: an
                 operation with the record's id exists once it was, and then its chunks are in the
                 outbox, so "sent, outcome unknown" is resolved there, never by a blind re-send)
    Completed    the first response is stored; replays get it with `Idempotent-Replayed: true`

A request answered on the synchronous path leaves its key InProgress: its answer is kept with its
chunk's end in the ledger (one write fewer while the caller waits), and the first replay completes the
key from there (shared.intake).

Explicit keys (the header, or `idempotencyKey` on the queue) live IDEMPOTENCY_TTL_SECONDS; keys derived
from the canonical body live DERIVED_KEY_TTL_SECONDS and are checked against the ledger's journal so
that they never swallow a change back (A, B, A sends three times).
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.errors import StateContention

if TYPE_CHECKING:
    from azure.data.tables import TableEntity

    from shared.storage import StateStore


ROW_KEY = "key"


class KeyKind(enum.Enum):
    EXPLICIT = "explicit"
    DERIVED = "derived"


class KeyState(enum.StrEnum):
    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"


@dataclass(frozen=True)
class IdempotencyKey:
    kind: KeyKind
    value: str  # the caller's key, or the request digest
    space: str = ""  # the tenant's key space (shared.tenants); "" is the home tenant's

    @property
    def partition_key(self) -> str:
        """`k-`/`d-` + SHA-256. The key space is hashed in ahead of the value, so two tenants never share
        a record; the home tenant's empty space keeps the hashes written before tenants existed. A NUL
        separates them: neither a header key (visible ASCII) nor a digest (hex) can contain one."""
        prefix = "k-" if self.kind is KeyKind.EXPLICIT else "d-"
        material = f"{self.space}\x00{self.value}" if self.space else self.value
        return prefix + hashlib.sha256(material.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StoredResponse:
    status: int
    headers: dict[str, str]
    body: str

    def dumps(self) -> str:
        """One string, for keeping the answer elsewhere (the ledger keeps a synchronous answer with its chunk)."""
        return json.dumps(
            {"status": self.status, "headers": self.headers, "body": self.body}, ensure_ascii=False
        )

    @classmethod
    def loads(cls, text: str) -> StoredResponse:
        document = json.loads(text)
        return cls(int(document["status"]), dict(document["headers"]), str(document["body"]))


@dataclass
class KeyRecord:
    key: IdempotencyKey
    state: KeyState
    digest: str
    operation_id: str
    claimed_at: float
    expires_at: float
    response: StoredResponse | None = None
    etag: str | None = field(default=None, compare=False)

    def to_entity(self) -> dict[str, Any]:
        entity: dict[str, Any] = {
            "PartitionKey": self.key.partition_key,
            "RowKey": ROW_KEY,
            "Kind": self.key.kind.value,
            "State": self.state,
            "Digest": self.digest,
            "OperationId": self.operation_id,
            "ClaimedAt": self.claimed_at,
            "ExpiresAt": self.expires_at,
        }
        if self.response is not None:
            entity["ResponseStatus"] = self.response.status
            entity["ResponseHeaders"] = json.dumps(self.response.headers)
            entity["ResponseBody"] = self.response.body
        return entity

    @classmethod
    def from_entity(cls, key: IdempotencyKey, e: TableEntity) -> KeyRecord:
        response = None
        if e.get("ResponseStatus") is not None:
            response = StoredResponse(
                int(e["ResponseStatus"]),
                json.loads(e.get("ResponseHeaders") or "{}"),
                e.get("ResponseBody") or "",
            )
        return cls(
            key=key,
            state=KeyState(e["State"]),
            digest=e["Digest"],
            operation_id=e["OperationId"],
            claimed_at=float(e["ClaimedAt"]),
            expires_at=float(e["ExpiresAt"]),
            response=response,
            etag=(getattr(e, "metadata", {}) or {}).get("etag"),
        )


class ClaimOutcome(enum.Enum):
    CLAIMED = "claimed"  # yours: go on and accept the request
    REPLAY = "replay"  # completed with the same body: answer the stored response
    IN_PROGRESS = "in_progress"  # someone is on it right now: 409
    MISMATCH = "mismatch"  # same explicit key, different body: 422
    STALE = "stale"  # an in-progress claim whose holder went quiet: ask the ledger, then take_over


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    record: KeyRecord


class IdempotencyStore:
    def __init__(
        self,
        table: StateStore,
        *,
        explicit_ttl: float,
        derived_ttl: float,
        claim_lease: float,
        clock: Callable[[], float] = time.time,
        key_space: str = "",
    ) -> None:
        self._table = table
        self.key_space = key_space
        self._explicit_ttl = explicit_ttl
        self._derived_ttl = derived_ttl
        self.claim_lease = claim_lease
        self._clock = clock

    def key(self, kind: KeyKind, value: str) -> IdempotencyKey:
        """A key in this store's key space."""
        return IdempotencyKey(kind, value, self.key_space)

    def _ttl(self, key: IdempotencyKey) -> float:
        return self._explicit_ttl if key.kind is KeyKind.EXPLICIT else self._derived_ttl

    def _new_record(self, key: IdempotencyKey, digest: str, operation_id: str) -> KeyRecord:
        now = self._clock()
        return KeyRecord(key, KeyState.IN_PROGRESS, digest, operation_id, now, now + self._ttl(key))

    async def claim(self, key: IdempotencyKey, digest: str, operation_id: str) -> Claim:
        """Claim the key for a new operation, or say what the existing record means for this request."""
        record = self._new_record(key, digest, operation_id)
        for _ in range(5):
            etag = await self._table.insert(record.to_entity())
            if etag is not None:
                record.etag = etag
                return Claim(ClaimOutcome.CLAIMED, record)
            existing = await self.get(key)
            if existing is None:
                continue  # purged between the insert and the read: try the insert again
            if existing.expires_at <= self._clock():
                replaced = await self.replace(existing, digest, operation_id)
                if replaced is not None:
                    return Claim(ClaimOutcome.CLAIMED, replaced)
                continue
            return Claim(self._judge(existing, digest), existing)
        raise StateContention("the idempotency key kept changing under five claims in a row")

    def _judge(self, existing: KeyRecord, digest: str) -> ClaimOutcome:
        if existing.digest != digest:
            return ClaimOutcome.MISMATCH
        if existing.state == KeyState.COMPLETED:
            return ClaimOutcome.REPLAY
        if self._clock() - existing.claimed_at > self.claim_lease:
            return ClaimOutcome.STALE
        return ClaimOutcome.IN_PROGRESS

    async def get(self, key: IdempotencyKey) -> KeyRecord | None:
        entity = await self._table.get(key.partition_key, ROW_KEY)
        return None if entity is None else KeyRecord.from_entity(key, entity)

    async def replace(self, existing: KeyRecord, digest: str, operation_id: str) -> KeyRecord | None:
        """Take the key over for a new claim if nobody changed it since it was read (ETag)."""
        record = self._new_record(existing.key, digest, operation_id)
        return await self._write_if_unchanged(record, existing.etag)

    async def take_over(self, stale: KeyRecord) -> KeyRecord | None:
        """Renew a stale claim for the same operation (its holder went quiet before accepting)."""
        record = KeyRecord(
            stale.key, KeyState.IN_PROGRESS, stale.digest, stale.operation_id, self._clock(), stale.expires_at
        )
        return await self._write_if_unchanged(record, stale.etag)

    async def complete(self, record: KeyRecord, response: StoredResponse) -> KeyRecord | None:
        """Store the first response. None if the record changed meanwhile (a takeover answered first)."""
        done = KeyRecord(
            record.key,
            KeyState.COMPLETED,
            record.digest,
            record.operation_id,
            record.claimed_at,
            record.expires_at,
            response,
        )
        return await self._write_if_unchanged(done, record.etag)

    async def release(self, record: KeyRecord) -> None:
        """Drop a claim whose request was never accepted (nothing sent), so a retry can proceed. If the
        record changed meanwhile, whoever changed it owns it now."""
        await self._table.delete(record.key.partition_key, ROW_KEY, record.etag)

    async def _write_if_unchanged(self, record: KeyRecord, etag: str | None) -> KeyRecord | None:
        new_etag = await self._table.replace(record.to_entity(), etag)
        if new_etag is None:
            return None
        record.etag = new_etag
        return record

    async def purge(self, before: float) -> int:
        entities = await self._table.query(
            "ExpiresAt lt @before", {"before": before}, ["PartitionKey", "RowKey"]
        )
        for entity in entities:
            await self._table.delete(entity["PartitionKey"], entity["RowKey"])
        return len(entities)
