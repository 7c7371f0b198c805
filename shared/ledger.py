"""The operations ledger: every accepted request, its chunks and their outcomes, in one Table partition.

Why one partition: Table Storage makes changes atomic only within a partition (entity-group transactions),
and three changes here must be atomic:

- Accepting a request: the accept counter moves on (ETag-conditioned), and the operation, its journal
  entry and all its pending chunks appear at once, numbered in acceptance order. The operation id was
  fixed when the idempotency key was claimed, so a second attempt to accept the same request (a takeover
  of a stale claim racing a slow first holder) fails on the operation's insert: a request is accepted
  at most once.
- Finishing a chunk: its pending entry is deleted and its result written in one transaction.
- Splitting a chunk after MaximumBatchSizeExceeded: the entry is replaced by its pieces, which keep its
  place in the order (their row keys sort right after it).

Row keys (all in partition `ledger`):
    counter              the next sequence number
    o-<operationId>      the operation
    j-<seq>              journal: what a request changed (for derived idempotency keys: A, B, A)
    p-<seq>[-<n>...]     a pending chunk (the outbox): Pending, or Sending while a call is in flight;
                         briefly also a finished one (see below)
    r-<seq>[-<n>...]     a finished chunk: Succeeded, Failed or OutcomeUnknown

Per-alert order (docs/contracts.md §3) is read from the pending entries: a chunk may be sent only when no pending
entry with a smaller row key shares an alert with it. Pending entries hold exactly one call's worth of
ids and one update, the shape a later scheduler can merge (same fields, disjoint alerts).

The synchronous path may check the order *before* accepting (`look_ahead`, read side by side with the
idempotency claim) and then accept its first chunk already marked Sending, which saves it two round
trips. That check is only valid if nothing was accepted between the read and the accept, so the accept
is conditioned on the counter's ETag as cached *before* the read was sent: an accept that happened in
between moved the counter, the transaction fails, and the request is accepted the ordinary way (chunks
Pending, order checked after accepting). Chunks only ever become pending by being accepted (a split
replaces one by pieces with the same alerts), so an unmoved counter means the read saw every pending
entry that could come before this request.

For the same reason the synchronous path records a chunk's end *in place* (`finish(in_place=True)`: one
write to its p- entry instead of a transaction), and the sweep later moves it to r- (`settle`). Readers
treat a p- entry in a finished state as finished: the order reads skip it, `pending_chunk` does not return
it, and `chunks_of` reports it as finished.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from shared.errors import AlreadyAccepted, LedgerConflict, StorageUnavailable
from shared.storage import conditional

if TYPE_CHECKING:
    from azure.data.tables import TableEntity

    from shared.coalescing import PendingView
    from shared.storage import StateStore

log = logging.getLogger(__name__)

PARTITION = "ledger"
COUNTER = "counter"
MAX_TRANSACTION = 100  # operations in one entity-group transaction
MAX_ENTRIES_PER_ACCEPT = MAX_TRANSACTION - 3  # counter + operation + journal + the chunks
GROUP_MAX_ALERTS = 5000  # alerts in one transaction of several requests (Ledger._take_group)
_SEQ_DIGITS = 12


class PendingState(enum.StrEnum):
    """A chunk in the outbox (p- entry): waiting, or with a call in flight."""

    PENDING = "Pending"
    SENDING = "Sending"


class ChunkResult(enum.StrEnum):
    """How a chunk ended (r- entry, or briefly its p- entry: see the module docstring)."""

    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    OUTCOME_UNKNOWN = "OutcomeUnknown"


ChunkState = PendingState | ChunkResult


def parse_chunk_state(value: str) -> ChunkState:
    """The state as stored; an unknown value is an error that names it (never silently Pending)."""
    try:
        return PendingState(value)
    except ValueError:
        return ChunkResult(value)


def seq_key(seq: int) -> str:
    return f"{seq:0{_SEQ_DIGITS}d}"


def fingerprints(alert_ids: Iterable[str]) -> bytes:
    """4-byte hashes of alert ids: enough to tell whether two requests touch a common alert.

    A collision only makes a derived key miss a replay (the request is sent again), never the reverse.
    """
    return b"".join(hashlib.blake2b(a.encode(), digest_size=4).digest() for a in sorted(set(alert_ids)))


def _split_fingerprints(blob: bytes) -> set[bytes]:
    return {blob[i : i + 4] for i in range(0, len(blob), 4)}


@dataclass
class Operation:
    operation_id: str
    created_at: float
    source: str
    caller: dict[str, Any]
    alert_count: int
    first_seq: int
    last_seq: int
    errors: list[dict[str, str]] = field(default_factory=list)
    invalid_status: int | None = None
    partition: str = PARTITION
    answer: str = ""  # a 202 its request keeps here rather than in its key (AcceptPlan.answer)

    @classmethod
    def from_entity(cls, e: TableEntity) -> Operation:
        return cls(
            operation_id=e["OperationId"],
            created_at=float(e["CreatedAt"]),
            source=e["Source"],
            caller=json.loads(e.get("Caller") or "{}"),
            alert_count=int(e.get("AlertCount", 0)),
            first_seq=int(e.get("FirstSeq", 0)),
            last_seq=int(e.get("LastSeq", -1)),
            errors=json.loads(e.get("Errors") or "[]"),
            invalid_status=e.get("InvalidStatus"),
            partition=e.get("PartitionKey", PARTITION),
            answer=e.get("Answer") or "",
        )

    def to_entity(self) -> dict[str, Any]:
        entity: dict[str, Any] = {
            "PartitionKey": self.partition,
            "RowKey": f"o-{self.operation_id}",
            "OperationId": self.operation_id,
            "CreatedAt": self.created_at,
            "Source": self.source,
            "Caller": json.dumps(self.caller),
            "AlertCount": self.alert_count,
            "FirstSeq": self.first_seq,
            "LastSeq": self.last_seq,
        }
        if self.errors:
            entity["Errors"] = json.dumps(self.errors)[:30000]
        if self.invalid_status is not None:
            entity["InvalidStatus"] = self.invalid_status
        if self.answer:
            entity["Answer"] = self.answer
        return entity


@dataclass
class Chunk:
    """A pending chunk (p-) or a finished one (r-): one MDE call's worth of ids and one update."""

    chunk_id: str
    operation_id: str
    alert_ids: tuple[str, ...]
    fields: dict[str, str]
    created_at: float
    state: ChunkState = PendingState.PENDING
    attempts: int = 0
    not_before: float = 0.0
    sending_since: float = 0.0
    updated_at: float = 0.0
    msg_token: str = ""
    msg_due_at: float = 0.0
    fresh_token: bool = False
    last_error: dict[str, Any] | None = None
    answer_status: int = 0
    finished_at: float = 0.0
    answer: str = ""  # the synchronous caller's answer, stored with the chunk's end (shared.intake)
    etag: str | None = None
    partition: str = PARTITION
    channel: str = ""  # the MDE API of its latest call (shared.channels): "batchUpdate" or "patch"
    call_id: str = ""  # that call's id, shared by every member of a coalesced call
    solo: bool = False  # never coalesced: sent apart after a coalesced call MDE refused (shared.coalescing)
    expected_at: float = 0.0  # when its next call is expected (epoch s): what Retry-After tells a poller

    @property
    def has_comment(self) -> bool:
        return "comment" in self.fields

    @property
    def seq(self) -> int:
        return int(self.chunk_id.split("-", 1)[0])

    @property
    def pending_key(self) -> str:
        return f"p-{self.chunk_id}"

    @property
    def result_key(self) -> str:
        return f"r-{self.chunk_id}"

    @property
    def finished(self) -> bool:
        return self.state in (ChunkResult.SUCCEEDED, ChunkResult.FAILED, ChunkResult.OUTCOME_UNKNOWN)

    @classmethod
    def from_entity(cls, e: TableEntity) -> Chunk:
        metadata = getattr(e, "metadata", {}) or {}
        return cls(
            chunk_id=e["RowKey"][2:],
            operation_id=e["OperationId"],
            alert_ids=tuple(json.loads(e["AlertIds"])),
            fields=json.loads(e.get("Fields") or "{}"),
            created_at=float(e.get("CreatedAt", 0.0)),
            state=parse_chunk_state(e.get("State", PendingState.PENDING)),
            attempts=int(e.get("Attempts", 0)),
            not_before=float(e.get("NotBefore", 0.0)),
            sending_since=float(e.get("SendingSince", 0.0)),
            updated_at=float(e.get("UpdatedAt", 0.0)),
            msg_token=e.get("MsgToken", ""),
            msg_due_at=float(e.get("MsgDueAt", 0.0)),
            fresh_token=bool(e.get("FreshToken", False)),
            last_error=json.loads(e["LastError"]) if e.get("LastError") else None,
            answer_status=int(e.get("AnswerStatus", 0)),
            finished_at=float(e.get("FinishedAt", 0.0)),
            answer=e.get("Answer", ""),
            etag=metadata.get("etag"),
            partition=e.get("PartitionKey", PARTITION),
            channel=e.get("Channel", ""),
            call_id=e.get("CallId", ""),
            solo=bool(e.get("Solo", False)),
            expected_at=float(e.get("ExpectedAt", 0.0)),
        )

    def _common(self) -> dict[str, Any]:
        entity: dict[str, Any] = {
            "PartitionKey": self.partition,
            "OperationId": self.operation_id,
            "AlertIds": json.dumps(list(self.alert_ids), separators=(",", ":")),
            "Fields": json.dumps(self.fields, ensure_ascii=False, separators=(",", ":")),
            "CreatedAt": self.created_at,
            "State": self.state,
            "Attempts": self.attempts,
        }
        if self.last_error is not None:
            entity["LastError"] = json.dumps(self.last_error, ensure_ascii=False)[:8000]
        if self.answer:
            entity["Answer"] = self.answer
        if self.call_id:
            entity["Channel"], entity["CallId"] = self.channel, self.call_id
        return entity

    def pending_entity(self) -> dict[str, Any]:
        return {
            **self._common(),
            "RowKey": self.pending_key,
            "NotBefore": self.not_before,
            "SendingSince": self.sending_since,
            "UpdatedAt": self.updated_at,
            "MsgToken": self.msg_token,
            "MsgDueAt": self.msg_due_at,
            "FreshToken": self.fresh_token,
            "Solo": self.solo,
            "ExpectedAt": self.expected_at,
        }

    def finished_pending_entity(self) -> dict[str, Any]:
        """The p- entry of a chunk that ended on the synchronous path, until the sweep settles it."""
        return {**self.pending_entity(), "AnswerStatus": self.answer_status, "FinishedAt": self.finished_at}

    def result_entity(self) -> dict[str, Any]:
        return {
            **self._common(),
            "RowKey": self.result_key,
            "AnswerStatus": self.answer_status,
            "FinishedAt": self.finished_at,
        }


@dataclass(frozen=True)
class OrderView:
    """The per-alert order as read before accepting: valid while the accept counter is still `counter`."""

    counter: tuple[int, str]  # (next seq, ETag) as cached before the read of the pending entries was sent
    blocked: bool  # a pending entry shares an alert with the request
    identical: bool = False  # a pending entry carries the same update (Ledger.look_ahead)


@dataclass(frozen=True)
class AcceptPlan:
    """What accepting a request writes: the operation and one chunk per call's worth of ids."""

    operation_id: str
    source: str
    caller: dict[str, Any]
    chunks: Sequence[tuple[tuple[str, ...], dict[str, str]]]
    digest: str
    # How long the accepting request keeps its chunks to itself before the sweep may queue them.
    hold_seconds: float = 0.0
    # The answer its request gives whatever happens next, written with the operation (its first
    # replay copies it to the idempotency key): built from the operation and chunks as accepted.
    answer: Callable[[Operation, list[Chunk]], str] | None = None


@dataclass
class _Accepting:
    """A request waiting to be accepted, and where its outcome goes (Ledger.accept)."""

    plan: AcceptPlan
    view: OrderView | None
    result: asyncio.Future[tuple[Operation, list[Chunk]]]
    writing: asyncio.Event | None = None  # set once its transaction is on its way (Ledger.accept)


class EndListener(Protocol):
    """What the ledger tells of the ends it records (shared.telemetry.EndWatcher)."""

    def accepted(self, operation: Operation) -> None: ...

    def ended(self, chunks: Sequence[Chunk]) -> None: ...

    def invalid(self, operation: Operation) -> None: ...


class Ledger:
    def __init__(self, table: StateStore, clock: Any = time.time, *, partition: str = PARTITION) -> None:
        self._table = table
        self.partition = partition
        self._clock = clock
        self._counter: tuple[int, str] | None = None  # (next seq, etag) as last seen
        self._lock = asyncio.Lock()  # one accept transaction at a time; the waiting go together next
        self._accepting: collections.deque[_Accepting] = collections.deque()
        # the light read of the unfinished entries in flight, and when it started (_light_entries)
        self._light_read: tuple[float, asyncio.Future[list[Chunk]]] | None = None
        self._next_light: asyncio.Future[list[Chunk]] | None = None  # the read that starts after it
        # told of every end this process records, right after its write (shared.telemetry.EndWatcher)
        self.watcher: EndListener | None = None

    def _ended(self, chunks: Sequence[Chunk]) -> None:
        if self.watcher is not None:
            self.watcher.ended(chunks)

    # --- accepting ----------------------------------------------------------------------------------

    async def look_ahead(
        self, alert_ids: Iterable[str], fields: dict[str, str] | None = None
    ) -> OrderView | None:
        """Whether any pending entry shares an alert with these, read before accepting (see the module
        docstring), and whether one carries the update `fields` (a stream of identical updates, which
        batchUpdate carries together); None when this process has no accept counter cached to condition
        the accept on. It is the light read the tries share (`_light_entries`), joined only if it
        started after the counter was taken."""
        counter = self._counter  # taken before the read is sent: that is what makes the view sound
        if counter is None:
            return None
        since = time.monotonic()
        mine = set(alert_ids)
        entries = await self._light_entries(since)
        blocked = any(mine.intersection(entry.alert_ids) for entry in entries)
        identical = fields is not None and any(entry.fields == fields for entry in entries)
        return OrderView(counter, blocked, identical)

    async def accept(
        self, plan: AcceptPlan, view: OrderView | None = None, writing: asyncio.Event | None = None
    ) -> tuple[Operation, list[Chunk]]:
        """Number the request's chunks and write operation, journal and chunks in one transaction.

        With a `view` that found the order clear, the first chunk is accepted marked Sending (attempt 1),
        conditioned on the counter the view was read against; if the counter has moved since, the request
        is accepted the ordinary way and every chunk is Pending.

        Accepts go one transaction at a time in a process (each moves the one counter), so the requests
        that arrive while one is being written are accepted together in the next (group commit,
        `_accept_together`): in a burst the counter, not the requests, sets the pace, and one
        transaction of many requests costs both ends far less than one each.

        `writing` is set once the transaction that accepts it is built and on its way (the seam's `sent`):
        a request meant to go beside it (shared.intake's budget request) waits for that, so the two
        round trips overlap instead of following each other.
        """
        if not 1 <= len(plan.chunks) <= MAX_ENTRIES_PER_ACCEPT:
            raise ValueError(f"a request is accepted as 1 to {MAX_ENTRIES_PER_ACCEPT} chunks")
        entry = _Accepting(plan, view, asyncio.get_running_loop().create_future(), writing)
        self._accepting.append(entry)
        try:
            async with self._lock:
                while not entry.result.done():
                    await self._accept_next()
        except asyncio.CancelledError:
            if entry in self._accepting:
                self._accepting.remove(entry)  # not taken into a transaction: nothing was written for it
            elif entry.result.done() and not entry.result.cancelled():
                entry.result.exception()  # its outcome is the canceller's to find out (as for a lone accept)
            raise
        return entry.result.result()

    async def _accept_next(self) -> None:
        """Accept the requests waiting at the head of the line: together if there are several, else (or
        if their transaction failed) one by one. Every request taken gets its outcome; one whose
        transaction was interrupted is told StorageUnavailable (whether it landed is unknown)."""
        group = self._take_group()
        try:
            if len(group) > 1:
                try:
                    if await self._accept_together(group):
                        return
                except Exception as exc:
                    for entry in group:
                        entry.result.set_exception(exc)
                    return
            for entry in group:
                try:
                    entry.result.set_result(await self._accept_alone(entry.plan, entry.view, entry.writing))
                except Exception as exc:
                    entry.result.set_exception(exc)
        finally:
            for entry in group:
                if not entry.result.done():
                    entry.result.set_exception(
                        StorageUnavailable("accepting was interrupted; whether it landed is unknown")
                    )

    def _take_group(self) -> list[_Accepting]:
        """The waiting requests from the head of the line that fit one transaction (and GROUP_MAX_ALERTS
        alerts, which keeps its body far below Table Storage's 4 MiB); at least one."""
        group: list[_Accepting] = []
        ops, alerts = 1, 0  # the counter
        while self._accepting:
            plan = self._accepting[0].plan
            more = sum(len(ids) for ids, _ in plan.chunks)
            if group and (ops + 2 + len(plan.chunks) > MAX_TRANSACTION or alerts + more > GROUP_MAX_ALERTS):
                break
            group.append(self._accepting.popleft())
            ops, alerts = ops + 2 + len(plan.chunks), alerts + more
        return group

    async def _accept_together(self, group: list[_Accepting]) -> bool:
        """One transaction for several requests, numbered in the order they arrived. A request accepted
        here starts Sending only if its view was read against this very counter and no request before it
        in the group shares an alert with it: then nothing that could come before it escaped the view.
        False (nothing written) if the counter moved or one of the operations exists already."""
        first, etag = self._counter or await self._read_counter()
        ops: list[Any] = [None]  # the counter, once the last number is known
        built: list[tuple[_Accepting, Operation, list[Chunk], int]] = []
        taken: set[str] = set()
        seq = first
        for entry in group:
            ids = {a for chunk_ids, _ in entry.plan.chunks for a in chunk_ids}
            view = entry.view
            sending = (
                view is not None and not view.blocked and view.counter == (first, etag) and not ids & taken
            )
            taken |= ids
            operation, chunks, own = self._accept_operations(entry.plan, seq, etag, sending)
            built.append((entry, operation, chunks, len(ops) + 2))  # where its chunks' ETags will be
            ops += own[1:]
            seq = operation.last_seq + 1
        ops[0] = conditional("update", {"PartitionKey": self.partition, "RowKey": COUNTER, "Next": seq}, etag)
        events = [entry.writing for entry in group if entry.writing is not None]

        def sent() -> None:
            for event in events:
                event.set()

        try:
            results = await self._table.transact(ops, sent)
        except BaseException:
            self._counter = None
            raise
        if results is None:
            self._counter = None
            return False
        self._counter = (seq, str(results[0]))
        for entry, operation, chunks, at in built:
            for chunk, etag_of_chunk in zip(chunks, results[at : at + len(chunks)], strict=True):
                chunk.etag = etag_of_chunk
            if self.watcher is not None:
                self.watcher.accepted(operation)
            entry.result.set_result((operation, chunks))
        log.info("accepted %d requests in one transaction", len(group))
        return True

    async def _accept_alone(
        self, plan: AcceptPlan, view: OrderView | None, writing: asyncio.Event | None = None
    ) -> tuple[Operation, list[Chunk]]:
        sending = view is not None and not view.blocked and view.counter == self._counter
        for attempt in range(30):
            first, etag = self._counter or await self._read_counter()  # the view's counter, if sending
            operation, chunks, ops = self._accept_operations(plan, first, etag, sending)
            try:
                results = await self._table.transact(ops, None if writing is None else writing.set)
            except BaseException:
                self._counter = None
                raise
            if results is None:  # the counter moved, or the operation exists already
                self._counter = None
                if await self.operation(plan.operation_id) is not None:
                    raise AlreadyAccepted(plan.operation_id)
                if not sending:
                    await asyncio.sleep(0.005 * (attempt + 1))
                sending = False  # the view is out of date: accept the ordinary way
                continue
            self._counter = (operation.last_seq + 1, str(results[0]))
            for chunk, etag_of_chunk in zip(chunks, results[3:], strict=True):
                chunk.etag = etag_of_chunk
            if self.watcher is not None:
                self.watcher.accepted(operation)
            return operation, chunks
        raise LedgerConflict("could not advance the accept counter after 30 attempts")

    def _accept_operations(
        self, plan: AcceptPlan, first: int, etag: str, sending: bool
    ) -> tuple[Operation, list[Chunk], list[Any]]:
        now = self._clock()
        last = first + len(plan.chunks) - 1
        all_ids = [a for ids, _ in plan.chunks for a in ids]
        operation = Operation(
            plan.operation_id,
            now,
            plan.source,
            plan.caller,
            len(all_ids),
            first,
            last,
            partition=self.partition,
        )
        chunks = [
            Chunk(
                seq_key(first + i),
                plan.operation_id,
                ids,
                dict(fields),
                now,
                updated_at=now,
                msg_due_at=now + plan.hold_seconds,
                msg_token=uuid.uuid4().hex,  # its message's token, so queuing it needs no second write
                partition=self.partition,
            )
            for i, (ids, fields) in enumerate(plan.chunks)
        ]
        if sending:
            chunks[0].state, chunks[0].sending_since, chunks[0].attempts = PendingState.SENDING, now, 1
        if plan.answer is not None:
            operation.answer = plan.answer(operation, chunks)
        counter = {"PartitionKey": self.partition, "RowKey": COUNTER, "Next": last + 1}
        journal = {
            "PartitionKey": self.partition,
            "RowKey": f"j-{seq_key(first)}",
            "Digest": plan.digest,
            "Fingerprints": fingerprints(all_ids),
            "AcceptedAt": now,
            "OperationId": plan.operation_id,
        }
        ops: list[Any] = [
            conditional("update", counter, etag),
            ("create", operation.to_entity()),
            ("create", journal),
        ]
        ops += [("create", c.pending_entity()) for c in chunks]
        return operation, chunks, ops

    async def _read_counter(self) -> tuple[int, str]:
        for _ in range(5):
            entity = await self._table.get(self.partition, COUNTER)
            if entity is not None:
                return int(entity["Next"]), str(entity.metadata["etag"])
            created = await self._table.insert({"PartitionKey": self.partition, "RowKey": COUNTER, "Next": 1})
            if created is not None:
                return 1, created
        raise LedgerConflict("could not read or create the accept counter")

    async def record_invalid(
        self,
        operation_id: str,
        source: str,
        caller: dict[str, Any],
        errors: list[dict[str, str]],
        status: int,
    ) -> Operation:
        """A request found invalid off the HTTP path (the inbound queue): a Failed operation, no chunks."""
        operation = Operation(
            operation_id, self._clock(), source, caller, 0, 0, -1, errors, status, partition=self.partition
        )
        if await self._table.insert(operation.to_entity()) is None:
            existing = await self.operation(operation_id)
            if existing is None:  # inserted by someone else, then purged: a storage oddity, try later
                raise StorageUnavailable(f"operation {operation_id} appeared and vanished")
            return existing
        if self.watcher is not None:
            self.watcher.invalid(operation)
        return operation

    # --- reading -------------------------------------------------------------------------------------

    async def operation(self, operation_id: str) -> Operation | None:
        entity = await self._table.get(self.partition, f"o-{operation_id}")
        return None if entity is None else Operation.from_entity(entity)

    async def chunks_of(self, operation: Operation) -> list[Chunk]:
        """Pending and finished chunks of an operation, in order (finished ones win if both exist)."""
        if operation.last_seq < operation.first_seq:
            return []
        lo, hi = seq_key(operation.first_seq), seq_key(operation.last_seq + 1)
        # Pending first, then finished: a chunk that finishes between the two reads is then seen at least
        # once (read side by side, it could be missed by both and the operation look done without it).
        pending = await self._range(f"p-{lo}", f"p-{hi}")
        finished = await self._range(f"r-{lo}", f"r-{hi}")
        by_id = {c.chunk_id: c for c in pending}
        by_id.update({c.chunk_id: c for c in finished})
        return [by_id[k] for k in sorted(by_id)]

    async def _range(self, lo: str, hi: str, select: list[str] | None = None) -> list[Chunk]:
        query = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"
        entities = await self._table.query(query, {"pk": self.partition, "lo": lo, "hi": hi}, select=select)
        return [Chunk.from_entity(e) for e in entities]

    async def pending_chunk(self, chunk_id: str) -> Chunk | None:
        """The chunk if it is still pending (not finished, not split)."""
        entity = await self._table.get(self.partition, f"p-{chunk_id}")
        chunk = None if entity is None else Chunk.from_entity(entity)
        return None if chunk is None or chunk.finished else chunk

    async def finished_chunk(self, chunk_id: str) -> Chunk | None:
        entity = await self._table.get(self.partition, f"r-{chunk_id}")
        return None if entity is None else Chunk.from_entity(entity)

    async def all_pending(self) -> list[Chunk]:
        return await self._range("p-", "p.")

    async def pending_view(self) -> PendingView:
        """Every unfinished pending entry, whole and in order, as one read: what a call's members are
        chosen from and then written back with (shared.coalescing)."""
        from shared.coalescing import PendingView

        entities = await self._table.query(_UNFINISHED_RANGE, _unfinished(self.partition, "p-", "p."))
        return PendingView([Chunk.from_entity(e) for e in entities], self._clock())

    async def view_ahead_of(self, chunk: Chunk, since: float | None = None) -> PendingView:
        """The unfinished pending entries accepted before `chunk`, then `chunk` itself: what the order
        check and the choice of channel decide from. Only the columns those rules read (a try reads
        this on every attempt, so it stays light); its entries must never be written back. `since`: see
        `_light_entries`."""
        from shared.coalescing import PendingView

        entries = await self._light_entries(since)
        ahead = [e for e in entries if e.pending_key < chunk.pending_key]
        return PendingView([*ahead, chunk], self._clock())

    async def identical_waiting_after(self, chunk: Chunk, since: float | None = None) -> bool:
        """Does a chunk accepted after `chunk` wait, Pending and out of back-off, with an identical update?
        (Then `chunk`'s call can carry it.) `since`: see `_light_entries`."""
        now = self._clock()
        return any(
            e.pending_key > chunk.pending_key
            and e.fields == chunk.fields
            and e.state == PendingState.PENDING
            and e.not_before <= now
            and not e.solo
            and not e.fresh_token
            for e in await self._light_entries(since)
        )

    async def identical_unfinished(self, chunk: Chunk, since: float | None = None) -> bool:
        """Is another update identical to `chunk`'s pending, waiting or in flight? Then more of the same
        are likely to come, and batchUpdate carries them together (docs/contracts.md §7, the choice of
        channel). `since`: see `_light_entries`."""
        return any(
            e.chunk_id != chunk.chunk_id and e.fields == chunk.fields
            for e in await self._light_entries(since)
        )

    async def _light_entries(self, since: float | None) -> list[Chunk]:
        """Every unfinished pending entry, light (the view's columns), in order.

        Concurrent tries in one process share reads: a try passes `since`, the monotonic time it began
        (after its chunk was accepted), and joins the latest read if that started no earlier, which
        therefore holds every entry accepted before its chunk. If the read in flight started earlier,
        the try joins the next read, which starts the moment that one ends and serves every try that
        came meanwhile. So at most one read is in flight, and one waits: under a burst, where a try
        begins every few milliseconds, this is one read of the whole backlog per read's latency instead
        of one per try (bench.throughput, workload a). Without `since`, a read of its own."""
        shared = self._light_read
        if since is not None and shared is not None:
            if shared[0] >= since:
                return await asyncio.shield(shared[1])
            if not shared[1].done():
                if self._next_light is None:
                    self._next_light = asyncio.ensure_future(self._light_after(shared[1]))
                return await asyncio.shield(self._next_light)
        return await self._read_shared()

    async def _read_shared(self) -> list[Chunk]:
        """A read made by the caller itself (at once: the synchronous path sends it beside claiming the
        key, and a task of its own would send it a loop turn later), which later tries may join."""
        joined: asyncio.Future[list[Chunk]] = asyncio.get_running_loop().create_future()
        self._light_read = (time.monotonic(), joined)
        try:
            entries = await self._read_light()
        except Exception as exc:
            joined.set_exception(exc)
            joined.exception()  # the caller raises it; joiners, if any, see it too
            raise
        except BaseException:
            joined.set_exception(StorageUnavailable("the shared read of the pending entries was cancelled"))
            joined.exception()
            raise
        joined.set_result(entries)
        return entries

    async def _light_after(self, previous: asyncio.Future[list[Chunk]]) -> list[Chunk]:
        await asyncio.wait([previous])
        self._next_light = None
        return await self._read_shared()

    async def _read_light(self) -> list[Chunk]:
        entities = await self._table.query(
            _UNFINISHED_RANGE, _unfinished(self.partition, "p-", "p."), select=_VIEW_COLUMNS
        )
        return [Chunk.from_entity(e) for e in entities]

    async def changed_since(self, seq: int, digest: str, alert_ids: Iterable[str]) -> bool:
        """Was a different update for any of these alerts accepted after `seq`? (derived keys: A, B, A)"""
        mine = _split_fingerprints(fingerprints(alert_ids))
        query = "PartitionKey eq @pk and RowKey gt @lo and RowKey lt @hi"
        entities = await self._table.query(
            query,
            {"pk": self.partition, "lo": f"j-{seq_key(seq)}", "hi": "j."},
            select=["Digest", "Fingerprints"],
        )
        for entity in entities:
            if entity["Digest"] != digest and mine & _split_fingerprints(bytes(entity["Fingerprints"])):
                return True
        return False

    # --- changing a pending chunk ------------------------------------------------------------------------

    async def update_pending(self, chunk: Chunk, **changes: Any) -> Chunk | None:
        """Change a pending chunk if nobody else did since it was read; None if someone did (or it ended)."""
        updated = dataclasses.replace(chunk, **changes, updated_at=self._clock())
        etag = await self._table.replace(updated.pending_entity(), chunk.etag)
        if etag is None:
            return None
        updated.etag = etag
        return updated

    async def update_together(
        self, chunks: Sequence[Chunk], change: Callable[[Chunk], dict[str, Any]]
    ) -> list[Chunk] | None:
        """Change several pending chunks in one transaction, each only if nobody changed it since it was
        read: all of them or none (None). The members of one call are marked Sending so, and no other
        sender can take one of them meanwhile (docs/contracts.md §7)."""
        if len(chunks) == 1:
            one = await self.update_pending(chunks[0], **change(chunks[0]))
            return None if one is None else [one]
        now = self._clock()
        updated = [dataclasses.replace(c, **change(c), updated_at=now) for c in chunks]
        return await self._replace_all(
            [(u, u.pending_entity(), c.etag) for u, c in zip(updated, chunks, strict=True)]
        )

    async def _replace_all(
        self, rows: Sequence[tuple[Chunk, dict[str, Any], str | None]]
    ) -> list[Chunk] | None:
        """Replace each chunk's entry if it is unchanged since `etag`, all in one transaction; the chunks
        with their new ETags, or None if any had changed (then none is written)."""
        results = await self._table.transact(
            [conditional("update", entity, etag) for _, entity, etag in rows]
        )
        if results is None:
            return None
        for (chunk, _, _), etag in zip(rows, results, strict=True):
            chunk.etag = etag
        return [chunk for chunk, _, _ in rows]

    async def finish_together(
        self,
        chunks: Sequence[Chunk],
        result: ChunkResult,
        answer_status: int,
        error: dict[str, Any] | None,
        *,
        answer_for: Callable[[Chunk], str] | None = None,
    ) -> list[Chunk] | None:
        """Record one outcome for every member of a call in place, in one transaction (the sweep settles
        them); None if any of them changed meanwhile (then each is recorded on its own by `finish`).
        `answer_for` builds the first chunk's kept answer, as in `finish`."""
        ended = [self.ended(c, result, answer_status, error) for c in chunks]
        if answer_for is not None:
            ended[0].answer = answer_for(ended[0])
        done = await self._replace_all([(e, e.finished_pending_entity(), e.etag) for e in ended])
        if done is not None:
            self._ended(done)
        return done

    def ended(
        self, chunk: Chunk, result: ChunkResult, answer_status: int, error: dict[str, Any] | None
    ) -> Chunk:
        """The chunk as `finish` records it."""
        now = self._clock()
        return dataclasses.replace(
            chunk,
            state=result,
            answer_status=answer_status,
            last_error=error,
            finished_at=now,
            updated_at=now,
        )

    async def finish(
        self,
        chunk: Chunk,
        result: ChunkResult,
        answer_status: int,
        error: dict[str, Any] | None,
        *,
        in_place: bool = False,
        answer_for: Callable[[Chunk], str] | None = None,
        persist_for: float = 0.0,
    ) -> Chunk:
        """Record a chunk's end: moved from pending to finished in one transaction, or `in_place` in its
        p- entry for `settle` to move later (idempotent: a second finish returns the first). `answer_for`
        builds, from the ended chunk, an answer to keep with it.

        A known outcome supersedes an OutcomeUnknown that the sweep wrote meanwhile (docs/contracts.md §3).
        With `persist_for`, storage faults are ridden out for that long (an outcome MDE told us is never
        given up for one the sweep would have to guess); then StorageUnavailable.
        """
        done = self.ended(chunk, result, answer_status, error)
        if answer_for is not None:
            done.answer = answer_for(done)
        give_up = time.monotonic() + persist_for
        while True:
            try:
                return await self._record_end(done, in_place)
            except StorageUnavailable:
                if time.monotonic() >= give_up:
                    raise
                log.warning("chunk %s: recording its end failed; trying again", chunk.chunk_id)
                await asyncio.sleep(0.5)

    async def _record_end(self, done: Chunk, in_place: bool) -> Chunk:
        """Write the end, conditioned on the pending entry as this process last saw it (`done.etag`), so
        an end is recorded once; if that entry changed, judge what is there instead."""
        for _ in range(5):
            if in_place:
                etag = await self._table.replace(done.finished_pending_entity(), done.etag)
                if etag is not None:
                    recorded = dataclasses.replace(done, etag=etag)
                    self._ended([recorded])
                    return recorded
            elif await self._table.transact(_settling(done, done.etag)) is not None:
                self._ended([done])
                return done
            existing, where = await self.finished_chunk(done.chunk_id), "r"
            if existing is None:
                entity = await self._table.get(self.partition, done.pending_key)
                if entity is None:
                    raise StorageUnavailable(f"chunk {done.chunk_id} is neither pending nor finished")
                existing, where = Chunk.from_entity(entity), "p"
                if not existing.finished:  # changed but not ended (a stale mark undone): ours is the end
                    done = dataclasses.replace(done, etag=existing.etag)
                    continue
            if existing.state == ChunkResult.OUTCOME_UNKNOWN and done.state != ChunkResult.OUTCOME_UNKNOWN:
                return await self._supersede(existing, done, where)
            return existing
        raise LedgerConflict(f"chunk {done.chunk_id} kept changing while its end was recorded")

    async def _supersede(self, unknown: Chunk, done: Chunk, where: str) -> Chunk:
        """A known outcome replaces the OutcomeUnknown the sweep recorded while it was on its way."""
        log.warning("chunk %s: known outcome %s supersedes OutcomeUnknown", done.chunk_id, done.state)
        entity = done.result_entity() if where == "r" else done.finished_pending_entity()
        etag = await self._table.replace(entity, unknown.etag)
        if etag is None:
            raise LedgerConflict(f"chunk {done.chunk_id} changed while its known outcome superseded it")
        recorded = dataclasses.replace(done, etag=etag)
        self._ended([recorded])
        return recorded

    async def settle(self, done: Chunk) -> bool:
        """Move a chunk finished in place from p- to r- (one transaction); False if someone else did."""
        return await self._table.transact(_settling(done, done.etag)) is not None

    async def split(
        self, chunk: Chunk, size: int, mark: Callable[[Chunk], dict[str, Any]] | None = None
    ) -> list[Chunk] | None:
        """Replace a pending chunk by pieces of at most `size` ids that keep its place in the order; None if
        someone else changed the chunk first. With `mark`, each piece is written with that change (the
        PATCH channel's pieces, marked Sending in the same transaction: one write before their calls)."""
        size = max(size, -(-len(chunk.alert_ids) // (MAX_TRANSACTION - 1)))  # one delete + the pieces
        pieces = [chunk.alert_ids[i : i + size] for i in range(0, len(chunk.alert_ids), size)]
        now = self._clock()
        new = [
            Chunk(
                f"{chunk.chunk_id}-{n:03d}",
                chunk.operation_id,
                ids,
                dict(chunk.fields),
                chunk.created_at,
                attempts=0,
                updated_at=now,
                not_before=0.0,
                partition=self.partition,
            )
            for n, ids in enumerate(pieces)
        ]
        if mark is not None:
            new = [dataclasses.replace(piece, **mark(piece)) for piece in new]
        delete = conditional(
            "delete", {"PartitionKey": self.partition, "RowKey": chunk.pending_key}, chunk.etag
        )
        ops: list[Any] = [delete, *(("create", c.pending_entity()) for c in new)]
        results = await self._table.transact(ops)
        if results is None:
            return None
        for piece, etag in zip(new, results[1:], strict=True):
            piece.etag = etag
        return new

    # --- purging -------------------------------------------------------------------------------------------

    async def purge(self, operations_before: float, journal_before: float) -> int:
        """Delete operations and results older than the key TTL, and journal entries past the derived TTL."""
        removed = 0
        plans = (
            ("o-", "o.", "CreatedAt", operations_before),
            ("r-", "r.", "FinishedAt", operations_before),
            ("j-", "j.", "AcceptedAt", journal_before),
        )
        for lo, hi, stamp, before in plans:
            query = f"PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi and {stamp} lt @before"
            params = {"pk": self.partition, "lo": lo, "hi": hi, "before": before}
            for entity in await self._table.query(query, params, select=["RowKey"]):
                await self._table.delete(self.partition, entity["RowKey"])
                removed += 1
        return removed


# Spaces around the parentheses: the SDK finds parameters by splitting the filter at spaces.
_UNFINISHED_RANGE = (
    "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi and ( State eq @pending or State eq @sending )"
)


_VIEW_COLUMNS = [
    "RowKey", "OperationId", "AlertIds", "Fields", "State", "NotBefore", "Solo", "FreshToken", "MsgDueAt",
]  # fmt: skip


def _unfinished(partition: str, lo: str, hi: str) -> dict[str, str]:
    """Parameters for _UNFINISHED_RANGE: the p- entries in [lo, hi) that have not ended."""
    return {
        "pk": partition,
        "lo": lo,
        "hi": hi,
        "pending": PendingState.PENDING,
        "sending": PendingState.SENDING,
    }


def _settling(done: Chunk, etag: str | None = None) -> list[Any]:
    """The transaction that moves a finished chunk from p- to r-: the p- entry must still be there (as
    read, with `etag`), so a chunk's end is moved, or superseded, only once."""
    pending = {"PartitionKey": done.partition, "RowKey": done.pending_key}
    return [conditional("delete", pending, etag or "*"), ("upsert", done.result_entity())]


def new_operation_id() -> str:
    return str(uuid.uuid4())
