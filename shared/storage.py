"""Table Storage: the clients, and the one place that reads and writes alertgate's state (the storage seam).

Every state write in alertgate is conditional (an insert that fails if the row exists, a replace that
fails if the ETag moved, an entity-group transaction holding such a write), and every one of them may
meet a storage fault: an idle keep-alive connection closed by the service, a 5xx, a timeout, or an
answer lost after the write took effect (docs/contracts.md §3, "Storage faults"). `StateTable` turns each
call into one of three ends, so no caller repeats the idiom:

- the value (the new ETag, the entity, the transaction's results): the write took effect;
- None: a condition failed, someone else's write came first (never a storage fault);
- `StorageUnavailable`: bounded retries with back-off could not settle it. The HTTP edge answers 503 with
  Retry-After; a queue invocation fails and its message comes back.

A write whose answer was lost is never assumed either way. Each write carries a fresh `WriteToken`
property, and after an ambiguous failure the row is read back: our token means the write took effect;
the old ETag means it did not and it is tried again; anything else means someone else's write came
first. The SDK's own retries are switched off (`retry_total=0`) because an SDK retry of a conditional
write that did land answers 412 and would turn our own success into a conflict; here every retry knows
whether an earlier attempt may have landed.

`MatchConditions` appears nowhere else in alertgate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from shared.errors import StorageUnavailable

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.data.tables import TableEntity
    from azure.data.tables.aio import TableClient, TableServiceClient

    from shared.settings import StorageSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

WRITE_TOKEN = "WriteToken"
"""The property every write through the seam stamps, so a lost answer can be reconciled by reading back."""

CONNECT_TIMEOUT_SECONDS = 3.0
READ_TIMEOUT_SECONDS = 3.0
"""A Table call normally answers in milliseconds; a connection that a middlebox silently dropped never
answers. Without a read timeout such a call waits for the SDK's default of 300 s; with a long one, a
request whose steps each meet a dead pooled connection outlasts its caller's patience. A slow answer
cut off here is only retried and reconciled, never lost."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long the seam keeps trying: `attempts` round trips, at most `deadline` seconds in all."""

    attempts: int = 6
    first_backoff: float = 0.05
    max_backoff: float = 1.0
    deadline: float = 20.0
    retry_after: float = 2.0  # what a caller is told to wait when the seam gives up

    def backoff(self, attempt: int) -> float:
        """Full jitter, doubling from `first_backoff` up to `max_backoff`."""
        return random.uniform(0, min(self.max_backoff, self.first_backoff * 2**attempt))


DEFAULT_POLICY = RetryPolicy()


# --- classifying failures ------------------------------------------------------------------------------


class ConditionFailed(Exception):
    """A transaction met a missing row: for its conditions, the same as a moved ETag."""

    status_code = 412


def is_conflict(exc: BaseException) -> bool:
    """A failed condition: 409 (the row exists) or 412 (the ETag moved), also inside a transaction."""
    status = getattr(exc, "status_code", None)
    if status in (409, 412):
        return True
    text = str(exc)
    return any(
        code in text for code in ("UpdateConditionNotSatisfied", "ConditionNotMet", "EntityAlreadyExists")
    )


def is_transient(exc: BaseException) -> bool:
    """A fault worth another try: no connection, no answer, a timeout, or the service failing (5xx, 408)."""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(exc, ServiceRequestError | ServiceResponseError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, HttpResponseError) and not is_conflict(exc):
        status = exc.status_code or 0
        return status >= 500 or status == 408
    return False


def may_have_landed(exc: BaseException) -> bool:
    """Whether a failed write could still have taken effect. Only a connection that was never made
    certainly carried nothing: azure-core reports a reset or a server disconnect *after* sending as
    ServiceRequestError too, so that type alone proves nothing."""
    import aiohttp
    from azure.core.exceptions import ServiceRequestError

    if not isinstance(exc, ServiceRequestError):
        return True
    cause = exc.inner_exception or exc.__cause__
    return not isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)


# --- the seam ------------------------------------------------------------------------------------------

Entity = Mapping[str, Any]
Operation = tuple[Any, ...]
"""A transaction operation as the SDK takes it: ("create"|"update"|"upsert"|"delete", entity[, kwargs])."""


class StateStore(Protocol):
    """What the ledger, the idempotency store and the budget need from a table (StateTable; fakes in tests)."""

    @property
    def name(self) -> str: ...

    async def get(self, partition_key: str, row_key: str) -> TableEntity | None: ...

    async def query(
        self, query: str, parameters: dict[str, Any], select: list[str] | None = None
    ) -> list[TableEntity]: ...

    async def insert(self, entity: Entity) -> str | None: ...

    async def replace(self, entity: Entity, etag: str | None) -> str | None: ...

    async def delete(self, partition_key: str, row_key: str, etag: str | None = None) -> bool: ...

    async def transact(
        self, operations: Sequence[Operation], sent: Callable[[], None] | None = None
    ) -> list[str | None] | None:
        """`sent`, if given, is called once the transaction's request is built and on its way (on each
        try): a caller can start a request it wants side by side with this one only then."""
        ...


class StateTable:
    """One table behind the seam. See the module docstring for the three ends of every call."""

    def __init__(self, client: TableClient, policy: RetryPolicy = DEFAULT_POLICY) -> None:
        self._client = client
        self.policy = policy
        self.round_trips = 0

    @property
    def name(self) -> str:
        return str(self._client.table_name)

    async def close(self) -> None:
        await self._client.close()

    # -- reads (retried blindly: they change nothing) ---------------------------------------------------

    async def get(self, partition_key: str, row_key: str) -> TableEntity | None:
        return await self._retrying(
            f"read {partition_key}/{row_key}", lambda: self._get(partition_key, row_key)
        )

    async def _get(self, partition_key: str, row_key: str) -> TableEntity | None:
        from azure.core.exceptions import ResourceNotFoundError

        self.round_trips += 1
        try:
            return await self._client.get_entity(partition_key, row_key)
        except ResourceNotFoundError:
            return None

    async def query(
        self, query: str, parameters: dict[str, Any], select: list[str] | None = None
    ) -> list[TableEntity]:
        async def listing() -> list[TableEntity]:
            self.round_trips += 1
            pages = self._client.query_entities(query, parameters=parameters, select=select)
            return [entity async for entity in pages]

        return await self._retrying(f"query {query}", listing)

    # -- writes ------------------------------------------------------------------------------------------

    async def insert(self, entity: Entity) -> str | None:
        """Create the row: its ETag, or None if the row exists (and is not the one we wrote)."""
        stamped, token = _stamped(entity)
        pk, rk = stamped["PartitionKey"], stamped["RowKey"]

        async def write() -> str:
            self.round_trips += 1
            meta = await self._client.create_entity(stamped)
            return str(meta["etag"])

        async def landed() -> str | _Again | None:
            current = await self._get(pk, rk)
            if current is None:
                return AGAIN
            return _etag(current) if current.get(WRITE_TOKEN) == token else None

        return await self._writing(f"insert {pk}/{rk}", write, landed)

    async def replace(self, entity: Entity, etag: str | None) -> str | None:
        """Replace the row if its ETag is still `etag` (None: whatever it is, as long as it exists): the new
        ETag, or None if it moved or the row is gone."""
        from azure.core import MatchConditions
        from azure.data.tables import UpdateMode

        stamped, token = _stamped(entity)
        pk, rk = stamped["PartitionKey"], stamped["RowKey"]
        condition = MatchConditions.Unconditionally if etag is None else MatchConditions.IfNotModified

        async def write() -> str | None:
            from azure.core.exceptions import ResourceNotFoundError

            self.round_trips += 1
            try:
                meta = await self._client.update_entity(
                    stamped, mode=UpdateMode.REPLACE, etag=etag, match_condition=condition
                )
            except ResourceNotFoundError:
                return None
            return str(meta["etag"])

        async def landed() -> str | _Again | None:
            current = await self._get(pk, rk)
            if current is None:
                return None
            if current.get(WRITE_TOKEN) == token:
                return _etag(current)
            return AGAIN if etag is None or _etag(current) == etag else None

        return await self._writing(f"replace {pk}/{rk}", write, landed, verify_conflicts=etag is not None)

    async def delete(self, partition_key: str, row_key: str, etag: str | None = None) -> bool:
        """Delete the row (if its ETag is still `etag`, when given): False if it moved. A missing row counts
        as deleted."""
        from azure.core import MatchConditions

        condition = MatchConditions.Unconditionally if etag is None else MatchConditions.IfNotModified

        async def write() -> bool:
            self.round_trips += 1
            await self._client.delete_entity(partition_key, row_key, etag=etag, match_condition=condition)
            return True

        async def landed() -> bool | _Again:
            current = await self._get(partition_key, row_key)
            if current is None:
                return True
            return AGAIN if etag is None or _etag(current) == etag else False

        outcome = await self._writing(
            f"delete {partition_key}/{row_key}", write, landed, verify_conflicts=etag is not None
        )
        return bool(outcome)

    async def transact(
        self, operations: Sequence[Operation], sent: Callable[[], None] | None = None
    ) -> list[str | None] | None:
        """One entity-group transaction: each operation's new ETag (None for deletes), or None if one of
        its conditions failed. After a lost answer every row it writes is read back: they carry the same
        token and land together or not at all, so one of them still carrying it means the transaction
        landed (another writer may have changed some since, e.g. the accept counter). A transaction of
        deletes only landed if every row is gone.
        """
        token = uuid.uuid4().hex
        stamped = [_stamp_operation(op, token) for op in operations]
        first = stamped[0][1]
        pk, rk = first["PartitionKey"], first["RowKey"]
        written = [op[1] for op in stamped if op[0] != "delete"]

        async def write() -> list[str | None]:
            from azure.core.exceptions import HttpResponseError

            self.round_trips += 1
            try:
                # The SDK's request hook runs after the multipart body is built, just before sending.
                hook = {} if sent is None else {"raw_request_hook": lambda _request: sent()}
                results = await self._client.submit_transaction(stamped, **hook)
            except HttpResponseError as exc:
                if exc.status_code == 404:  # a row the transaction deletes or updates is gone: a condition
                    raise ConditionFailed(str(exc)) from exc
                raise
            return [
                None if op[0] == "delete" else str(meta.get("etag"))
                for op, meta in zip(stamped, results, strict=True)
            ]

        async def landed() -> list[str | None] | _Again | None:
            if not written:
                rows = [await self._get(op[1]["PartitionKey"], op[1]["RowKey"]) for op in stamped]
                return [None] * len(stamped) if all(row is None for row in rows) else AGAIN
            for row in written:
                current = await self._get(row["PartitionKey"], row["RowKey"])
                if current is not None and current.get(WRITE_TOKEN) == token:
                    return await self._etags_of(stamped, token)
            # Not ours. Whether a condition failed or the transaction never ran, only a new try can tell
            # (it answers a conflict if one of the conditions fails).
            return AGAIN

        return await self._writing(f"transaction on {pk}/{rk}", write, landed)

    async def _etags_of(self, operations: Sequence[Operation], token: str) -> list[str | None]:
        """The ETags a landed transaction gave its rows, read back. A row someone changed since no longer
        carries our token: its ETag now is theirs, and handing it out as ours would let a later
        conditional write overwrite their change unseen, so it gets one that matches nothing."""
        etags: list[str | None] = []
        for op in operations:
            if op[0] == "delete":
                etags.append(None)
                continue
            current = await self._get(op[1]["PartitionKey"], op[1]["RowKey"])
            ours = current is not None and current.get(WRITE_TOKEN) == token
            etags.append(_etag(current) if ours and current is not None else CHANGED_SINCE)
        return etags

    # -- the retry loops ---------------------------------------------------------------------------------

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(f"{what} in table {self.name}", call, self.policy)

    async def _writing(
        self,
        what: str,
        write: Callable[[], Awaitable[T]],
        landed: Callable[[], Awaitable[T | _Again | None]],
        *,
        verify_conflicts: bool = False,
    ) -> T | None:
        """A conditional write: its value, None on a failed condition, or StorageUnavailable.

        After a failure that may have landed, and after a conflict that follows such a failure (our own
        earlier attempt may be what the condition met), or any conflict of a conditional PUT or DELETE
        (`verify_conflicts`: aiohttp itself re-sends those once, unseen, when a reused keep-alive
        connection drops, so a 412 can be the answer to our own write's second copy), `landed` reads back and says: the value (ours
        took effect), None (someone else's did), or AGAIN (nothing did: write again).
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.policy.deadline
        last: BaseException | None = None
        ambiguous = False  # an earlier attempt may have landed
        check_first = False  # read back before writing again
        conflicted = False  # a condition failed after an ambiguous attempt
        for attempt in range(self.policy.attempts):
            try:
                if check_first:
                    outcome = await landed()
                    check_first = False
                    if not isinstance(outcome, _Again):
                        return outcome
                    if conflicted:
                        return None  # ours did not land, so the failed condition was someone else's write
                return await write()
            except Exception as exc:
                last = exc
                if is_conflict(exc):
                    if not (ambiguous or verify_conflicts):
                        return None
                    check_first = conflicted = True  # was it our own earlier attempt the condition met?
                    continue
                if not is_transient(exc):
                    raise
                if may_have_landed(exc):
                    ambiguous = check_first = True
            pause = self.policy.backoff(attempt)
            if attempt == self.policy.attempts - 1 or loop.time() + pause >= give_up:
                break
            log.info("storage: %s failed (%s); trying again", what, _first_line(last))
            await asyncio.sleep(pause)
        raise self._unavailable(what, last)

    def _unavailable(self, what: str, last: BaseException | None) -> StorageUnavailable:
        detail = f"{what} in table {self.name}: {_first_line(last) if last else 'no answer'}"
        log.warning("storage unavailable: %s", detail)
        error = StorageUnavailable(detail, retry_after=self.policy.retry_after)
        error.__cause__ = last
        return error


async def with_retries(
    what: str, call: Callable[[], Awaitable[T]], policy: RetryPolicy = DEFAULT_POLICY
) -> T:
    """A call that is safe to repeat (a read; a queue message, whose duplicates the worker drops): retried
    on transient faults with back-off, StorageUnavailable when they persist."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + policy.deadline
    last: BaseException | None = None
    for attempt in range(policy.attempts):
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            last = exc
        pause = policy.backoff(attempt)
        if attempt == policy.attempts - 1 or loop.time() + pause >= give_up:
            break
        await asyncio.sleep(pause)
    detail = f"{what}: {_first_line(last) if last else 'no answer'}"
    log.warning("storage unavailable: %s", detail)
    raise StorageUnavailable(detail, retry_after=policy.retry_after) from last


# An ETag no row has: a conditional write with it fails (the row changed since we wrote it).
CHANGED_SINCE = "W/\"datetime'1900-01-01T00%3A00%3A00.0000000Z'\""


class _Again:
    """`landed`'s answer for "nothing took effect: write again"."""


AGAIN = _Again()


def _stamped(entity: Entity) -> tuple[dict[str, Any], str]:
    token = uuid.uuid4().hex
    return {**entity, WRITE_TOKEN: token}, token


def _stamp_operation(op: Operation, token: str) -> Operation:
    if op[0] == "delete":
        return op
    return (op[0], {**op[1], WRITE_TOKEN: token}, *op[2:])


def _etag(entity: TableEntity) -> str:
    return str(entity.metadata["etag"])


def _first_line(exc: BaseException | None) -> str:
    text = str(exc or "").strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def conditional(op: str, entity: Entity, etag: str | None) -> Operation:
    """A transaction operation conditioned on `etag` ("update" or "delete"), for `StateTable.transact`."""
    from azure.core import MatchConditions
    from azure.data.tables import UpdateMode

    if op == "delete":
        return ("delete", entity, {"etag": etag, "match_condition": MatchConditions.IfNotModified})
    return (
        op,
        entity,
        {"mode": UpdateMode.REPLACE, "etag": etag, "match_condition": MatchConditions.IfNotModified},
    )


# --- the tables and their clients ----------------------------------------------------------------------


@dataclass
class Tables:
    """The tables alertgate keeps its shared state in (docs/architecture.md, "State"):

    - `<prefix>Keys`: idempotency keys (shared.idempotency);
    - `<prefix>Operations`: the operations ledger (shared.ledger), one partition per tenant;
    - `<prefix>Budget`: the shared call budget (shared.ratelimit) and the learned batch limit.
    """

    keys: StateTable
    operations: StateTable
    budget: StateTable

    @classmethod
    def from_service(cls, service: TableServiceClient, prefix: str) -> Tables:
        return cls(
            keys=StateTable(service.get_table_client(f"{prefix}Keys")),
            operations=StateTable(service.get_table_client(f"{prefix}Operations")),
            budget=StateTable(service.get_table_client(f"{prefix}Budget")),
        )

    def all(self) -> list[StateTable]:
        return [self.keys, self.operations, self.budget]

    async def ensure_exist(self, service: TableServiceClient) -> None:
        """Create the tables if missing (infra creates them in Azure; Azurite starts empty)."""
        await asyncio.gather(*(service.create_table_if_not_exists(t.name) for t in self.all()))

    async def close(self) -> None:
        await asyncio.gather(*(t.close() for t in self.all()))


def storage_credential(storage: StorageSettings) -> AsyncTokenCredential | None:
    """None with a connection string; otherwise the credential the `__credential` setting names.

    With identity-based settings the same user-assigned identity that the Functions host uses for storage
    (`AzureWebJobsStorage__clientId`) is used here, so one role assignment covers both.
    """
    if storage.connection_string:
        return None
    from shared.tokens import make_credential

    use_mi = (storage.credential or "").lower() == "managedidentity"
    return make_credential(use_mi, storage.client_id)


def client_options() -> dict[str, Any]:
    """The SDK's retries off (the seam retries, knowing what may have landed) and bounded timeouts, over
    a transport that can hold a request back until another is on its way (`sending_after`).

    The environment is trusted only when it names a proxy: an aiohttp session that trusts it also looks
    for ~/.netrc credentials in a worker thread on every request, which under a burst cost the worker
    process about a third of its CPU (docs/architecture.md, "Storage clients")."""
    connection: dict[str, Any] = {
        "connection_timeout": CONNECT_TIMEOUT_SECONDS,
        "read_timeout": READ_TIMEOUT_SECONDS,
    }
    if not proxy_in_environment():
        connection["use_env_settings"] = False
    return {"retry_total": 0, **connection, "transport": _held_back_transport()(**connection)}


SEND_AFTER_MAX_SECONDS = 1.0
"""The longest a request made under `sending_after` waits for the other to go out: a bound, not a
schedule (the other normally goes out within milliseconds, or its task ends and sets the event)."""

_SEND_AFTER: ContextVar[asyncio.Event | None] = ContextVar("alertgate_send_after", default=None)


@contextlib.contextmanager
def sending_after(event: asyncio.Event) -> Iterator[None]:
    """Storage requests this task makes inside the block are built at once but leave only once `event`
    is set. Two requests meant to go side by side (the synchronous path's accept and budget request)
    then both are in flight together: started together, the small one used to come back while the SDK
    was still building the other's body, and they made two round trips in a row."""
    token = _SEND_AFTER.set(event)
    try:
        yield
    finally:
        _SEND_AFTER.reset(token)


_TRANSPORT: type | None = None


def _held_back_transport() -> type:
    """The SDK's aiohttp transport, waiting for a `sending_after` event before it sends (built on first
    use: importing the transport is the SDK's cost, paid when a client is made anyway)."""
    global _TRANSPORT
    if _TRANSPORT is None:
        from azure.core.pipeline.transport import AioHttpTransport

        class HeldBackTransport(AioHttpTransport):  # type: ignore[misc]
            async def send(self, request: Any, **config: Any) -> Any:
                event = _SEND_AFTER.get()
                if event is not None and not event.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), SEND_AFTER_MAX_SECONDS)
                return await super().send(request, **config)

        _TRANSPORT = HeldBackTransport
    return _TRANSPORT


def proxy_in_environment() -> bool:
    """Does the environment name an HTTP(S) proxy (the variables the SDK's transport would read)?"""
    import urllib.request

    proxies = urllib.request.getproxies_environment()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


def table_service(storage: StorageSettings, credential: AsyncTokenCredential | None) -> TableServiceClient:
    from azure.data.tables.aio import TableServiceClient

    if storage.connection_string:
        return TableServiceClient.from_connection_string(storage.connection_string, **client_options())
    assert storage.table_service_uri is not None and credential is not None  # settings guarantee both
    return TableServiceClient(endpoint=storage.table_service_uri, credential=credential, **client_options())
