"""The storage seam (shared.storage.StateTable) over FakeTableClient: every end of every call.

Each write ends in its value (it took effect), None (a condition failed: someone else's write came
first) or StorageUnavailable (bounded retries ran out). The cases that matter are the ambiguous ones: a
write whose answer was lost is reconciled by reading back the WriteToken it stamped, never assumed
either way. Back-offs are sub-millisecond, so the file runs in well under a second.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import pytest
from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import TableTransactionError, UpdateMode

from shared.errors import StorageUnavailable
from shared.storage import (
    CHANGED_SINCE,
    WRITE_TOKEN,
    ConditionFailed,
    RetryPolicy,
    StateTable,
    client_options,
    conditional,
    is_conflict,
    is_transient,
    may_have_landed,
    with_retries,
)
from tests.fakes import FakeTableClient, Fault, http_error

if TYPE_CHECKING:
    from azure.data.tables.aio import TableClient

FAST = RetryPolicy(attempts=4, first_backoff=0.0005, max_backoff=0.001, deadline=2.0, retry_after=7.0)
PK = "ledger"


def seam(policy: RetryPolicy = FAST) -> tuple[StateTable, FakeTableClient]:
    client = FakeTableClient("alertgateOperations")
    return StateTable(cast("TableClient", client), policy), client


def row(rk: str = "a", **props: Any) -> dict[str, Any]:
    return {"PartitionKey": PK, "RowKey": rk, **props}


def stored(client: FakeTableClient, rk: str = "a") -> Any:
    entity = client.state.read(PK, rk)
    assert entity is not None, f"row {rk} is missing"
    return entity


def error(status: int, code: str = "Whatever") -> HttpResponseError:
    return http_error(HttpResponseError, status, code, f"HTTP {status}")


# --- reads --------------------------------------------------------------------------------------------------


async def test_a_read_is_retried_after_a_transient_fault() -> None:
    table, client = seam()
    client.state.put(row(V=1))
    client.inject(Fault.NOT_SENT, method="get_entity")
    client.inject(Fault.UNAVAILABLE, method="get_entity")

    entity = await table.get(PK, "a")

    assert entity is not None and entity["V"] == 1
    assert entity.metadata["etag"] == stored(client).metadata["etag"]
    assert client.calls == ["get_entity"] * 3
    assert table.round_trips == 3


async def test_a_missing_row_reads_as_none() -> None:
    table, _ = seam()
    assert await table.get(PK, "nothing") is None


async def test_a_read_gives_up_with_storage_unavailable_and_retry_after() -> None:
    table, client = seam()
    client.inject(Fault.UNAVAILABLE, method="get_entity", times=100)

    with pytest.raises(StorageUnavailable) as raised:
        await table.get(PK, "a")

    assert raised.value.retry_after == 7.0
    assert isinstance(raised.value.__cause__, HttpResponseError)
    assert raised.value.__cause__.status_code == 503
    assert "alertgateOperations" in str(raised.value)
    assert client.count("get_entity") == FAST.attempts


async def test_a_query_is_retried_and_returns_rows_in_key_order_with_select() -> None:
    table, client = seam()
    for rk in ("p-2", "p-1", "q-1"):
        client.state.put(row(rk, State="Pending", Other="x"))
    client.inject(Fault.LOST, method="query_entities")

    entities = await table.query(
        "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
        {"pk": PK, "lo": "p-", "hi": "p."},
        select=["RowKey", "State"],
    )

    assert [e["RowKey"] for e in entities] == ["p-1", "p-2"]
    assert all(set(e) == {"RowKey", "State"} for e in entities)
    assert client.count("query_entities") == 2


async def test_a_non_transient_read_error_propagates_unchanged() -> None:
    table, client = seam()
    bad = error(403, "AuthorizationFailure")
    client.inject(bad, method="get_entity")

    with pytest.raises(HttpResponseError) as raised:
        await table.get(PK, "a")

    assert raised.value is bad
    assert client.calls == ["get_entity"]


async def test_with_retries_gives_up_with_the_policys_retry_after() -> None:
    calls = 0

    async def flaky() -> int:
        nonlocal calls
        calls += 1
        raise TimeoutError("no answer")

    with pytest.raises(StorageUnavailable) as raised:
        await with_retries("send a message", flaky, FAST)

    assert calls == FAST.attempts
    assert raised.value.retry_after == FAST.retry_after
    assert "send a message" in str(raised.value)


# --- insert -------------------------------------------------------------------------------------------------


async def test_insert_returns_the_etag_and_stamps_a_write_token() -> None:
    table, client = seam()

    etag = await table.insert(row(V=1))

    assert etag == stored(client).metadata["etag"]
    assert stored(client)[WRITE_TOKEN]
    assert client.calls == ["create_entity"]


async def test_insert_whose_answer_was_lost_but_landed_returns_its_etag() -> None:
    table, client = seam()
    client.inject(Fault.LOST, method="create_entity")

    etag = await table.insert(row(V=1))

    assert etag is not None
    assert etag == stored(client).metadata["etag"]
    assert client.calls == ["create_entity", "get_entity"]  # read back, not written again


async def test_insert_that_did_not_land_is_written_again() -> None:
    table, client = seam()
    client.inject(Fault.UNAVAILABLE, method="create_entity")

    etag = await table.insert(row(V=1))

    assert etag == stored(client).metadata["etag"]
    assert client.calls == ["create_entity", "get_entity", "create_entity"]


async def test_insert_that_landed_late_meets_its_own_row_and_returns_its_etag() -> None:
    """The lost write lands after the read-back found nothing: the retry's 409 is our own row."""
    table, client = seam()
    client.inject(Fault.LATE, method="create_entity")

    etag = await table.insert(row(V=1))

    assert etag is not None and etag == stored(client).metadata["etag"]
    assert client.calls == ["create_entity", "get_entity", "create_entity", "get_entity"]


async def test_insert_of_an_existing_row_is_none_without_a_retry() -> None:
    table, client = seam()
    client.state.put(row(V=0))

    assert await table.insert(row(V=1)) is None
    assert client.calls == ["create_entity"]
    assert stored(client)["V"] == 0


async def test_insert_conflict_after_a_lost_answer_that_did_not_land_is_none() -> None:
    table, client = seam()
    client.inject(Fault.UNAVAILABLE, method="create_entity")
    client.inject(lambda: client.state.put(row(V=0)), method="create_entity")  # someone else, first

    assert await table.insert(row(V=1)) is None
    assert stored(client)["V"] == 0


async def test_a_request_that_was_not_sent_is_retried_without_a_read_back() -> None:
    table, client = seam()
    client.inject(Fault.NOT_SENT, method="create_entity")

    assert await table.insert(row(V=1)) is not None
    assert client.calls == ["create_entity", "create_entity"]


async def test_a_non_transient_write_error_propagates_unchanged() -> None:
    table, client = seam()
    bad = error(400, "InvalidInput")
    client.inject(bad, method="create_entity")

    with pytest.raises(HttpResponseError) as raised:
        await table.insert(row(V=1))

    assert raised.value is bad
    assert client.calls == ["create_entity"]


async def test_a_write_gives_up_after_the_policys_attempts() -> None:
    table, client = seam()
    client.inject(Fault.UNAVAILABLE, method="create_entity", times=100)

    with pytest.raises(StorageUnavailable) as raised:
        await table.insert(row(V=1))

    assert client.count("create_entity") == FAST.attempts
    assert raised.value.retry_after == FAST.retry_after
    assert isinstance(raised.value.__cause__, HttpResponseError)


async def test_a_read_back_that_fails_is_itself_retried() -> None:
    table, client = seam()
    client.inject(Fault.LOST, method="create_entity")
    client.inject(Fault.NOT_SENT, method="get_entity")

    etag = await table.insert(row(V=1))

    assert etag == stored(client).metadata["etag"]
    assert client.calls == ["create_entity", "get_entity", "get_entity"]


# --- replace ------------------------------------------------------------------------------------------------


async def test_replace_if_unchanged_returns_the_new_etag_and_replaces_all_properties() -> None:
    table, client = seam()
    old = client.state.put(row(V=1, Gone="x"))

    etag = await table.replace(row(V=2), old)

    assert etag is not None and etag != old
    assert stored(client)["V"] == 2 and "Gone" not in stored(client)


async def test_replace_with_a_moved_etag_is_none_after_a_read_back() -> None:
    table, client = seam()
    old = client.state.put(row(V=1))
    client.state.put(row(V=9))

    assert await table.replace(row(V=2), old) is None
    assert client.calls == ["update_entity", "get_entity"]  # a 412 may answer aiohttp's own re-send
    assert stored(client)["V"] == 9


async def test_replace_whose_answer_was_lost_but_landed_returns_the_new_etag() -> None:
    table, client = seam()
    old = client.state.put(row(V=1))
    client.inject(Fault.LOST, method="update_entity")

    etag = await table.replace(row(V=2), old)

    assert etag is not None and etag == stored(client).metadata["etag"]
    assert stored(client)["V"] == 2
    assert client.calls == ["update_entity", "get_entity"]


async def test_replace_that_did_not_land_is_written_again() -> None:
    table, client = seam()
    old = client.state.put(row(V=1))
    client.inject(Fault.UNAVAILABLE, method="update_entity")

    etag = await table.replace(row(V=2), old)

    assert etag == stored(client).metadata["etag"]
    assert client.calls == ["update_entity", "get_entity", "update_entity"]


async def test_a_412_after_an_earlier_lost_answer_that_landed_is_our_etag() -> None:
    """Our first write lands late (after the read-back saw the old row): the retry meets our own write."""
    table, client = seam()
    old = client.state.put(row(V=1))
    client.inject(Fault.LATE, method="update_entity")

    etag = await table.replace(row(V=2), old)

    assert etag is not None
    assert etag == stored(client).metadata["etag"]
    assert stored(client)["V"] == 2
    assert client.calls == ["update_entity", "get_entity", "update_entity", "get_entity"]


async def test_a_412_after_an_earlier_lost_answer_that_did_not_land_is_none() -> None:
    table, client = seam()
    old = client.state.put(row(V=1))
    client.inject(Fault.UNAVAILABLE, method="update_entity")
    client.inject(lambda: client.state.put(row(V=9)), method="update_entity")  # someone else, first

    assert await table.replace(row(V=2), old) is None
    assert stored(client)["V"] == 9
    assert client.calls == ["update_entity", "get_entity", "update_entity", "get_entity"]


async def test_a_read_back_showing_someone_elses_write_is_none_without_writing_again() -> None:
    table, client = seam()
    old = client.state.put(row(V=1))
    client.inject(Fault.UNAVAILABLE, method="update_entity")
    client.inject(lambda: client.state.put(row(V=9)), method="get_entity")

    assert await table.replace(row(V=2), old) is None
    assert client.calls == ["update_entity", "get_entity"]


async def test_unconditional_replace_of_a_missing_row_is_none() -> None:
    table, client = seam()

    assert await table.replace(row(V=2), None) is None
    assert client.calls == ["update_entity"]
    assert client.state.read(PK, "a") is None


async def test_conditional_replace_of_a_missing_row_is_none() -> None:
    table, client = seam()
    old = client.state.put(row(V=1))
    client.state.delete(PK, "a", None, None)

    assert await table.replace(row(V=2), old) is None


async def test_unconditional_replace_whose_answer_was_lost_returns_the_etag() -> None:
    table, client = seam()
    client.state.put(row(V=1))
    client.inject(Fault.LOST, method="update_entity")

    etag = await table.replace(row(V=2), None)

    assert etag == stored(client).metadata["etag"]


async def test_unconditional_replace_retried_after_a_fault_that_did_not_land() -> None:
    table, client = seam()
    client.state.put(row(V=1))
    client.inject(Fault.UNAVAILABLE, method="update_entity")
    client.inject(lambda: client.state.put(row(V=9)), method="get_entity")  # moved, but no condition

    etag = await table.replace(row(V=2), None)

    assert etag == stored(client).metadata["etag"] and stored(client)["V"] == 2


async def test_unconditional_replace_of_a_row_deleted_after_a_lost_answer_is_none() -> None:
    table, client = seam()
    client.state.put(row(V=1))
    client.inject(Fault.UNAVAILABLE, method="update_entity")
    client.inject(lambda: client.state.delete(PK, "a", None, None), method="get_entity")

    assert await table.replace(row(V=2), None) is None
    assert client.calls == ["update_entity", "get_entity"]


# --- delete -------------------------------------------------------------------------------------------------


async def test_delete_removes_the_row() -> None:
    table, client = seam()
    client.state.put(row())

    assert await table.delete(PK, "a") is True
    assert client.state.read(PK, "a") is None


async def test_delete_of_a_missing_row_counts_as_deleted() -> None:
    table, _ = seam()
    assert await table.delete(PK, "a") is True
    assert await table.delete(PK, "a", 'W/"some-etag"') is True


async def test_delete_if_unchanged() -> None:
    table, client = seam()
    old = client.state.put(row(V=1))
    current = client.state.put(row(V=2))

    assert await table.delete(PK, "a", old) is False
    assert client.calls == ["delete_entity", "get_entity"]  # a 412 may answer aiohttp's own re-send
    assert stored(client)["V"] == 2
    assert await table.delete(PK, "a", current) is True
    assert client.state.read(PK, "a") is None


async def test_delete_whose_answer_was_lost_but_landed_is_true() -> None:
    table, client = seam()
    etag = client.state.put(row())
    client.inject(Fault.LOST, method="delete_entity")

    assert await table.delete(PK, "a", etag) is True
    assert client.calls == ["delete_entity", "get_entity"]


async def test_delete_that_did_not_land_is_sent_again() -> None:
    table, client = seam()
    etag = client.state.put(row())
    client.inject(Fault.UNAVAILABLE, method="delete_entity")

    assert await table.delete(PK, "a", etag) is True
    assert client.calls == ["delete_entity", "get_entity", "delete_entity"]
    assert client.state.read(PK, "a") is None


async def test_delete_after_a_lost_answer_and_someone_elses_write_is_false() -> None:
    table, client = seam()
    etag = client.state.put(row(V=1))
    client.inject(Fault.UNAVAILABLE, method="delete_entity")
    client.inject(lambda: client.state.put(row(V=9)), method="get_entity")

    assert await table.delete(PK, "a", etag) is False
    assert stored(client)["V"] == 9


async def test_unconditional_delete_after_a_lost_answer_deletes_whatever_is_there() -> None:
    table, client = seam()
    client.state.put(row(V=1))
    client.inject(Fault.UNAVAILABLE, method="delete_entity")
    client.inject(lambda: client.state.put(row(V=9)), method="get_entity")

    assert await table.delete(PK, "a") is True
    assert client.state.read(PK, "a") is None


# --- transactions -------------------------------------------------------------------------------------------


def _accept_ops(counter_etag: str) -> list[Any]:
    return [
        conditional("update", row("counter", Next=3), counter_etag),
        ("create", row("o-1", Op="x")),
        ("create", row("p-1", State="Pending")),
    ]


async def test_a_transaction_returns_each_operations_etag_and_none_for_deletes() -> None:
    table, client = seam()
    counter = client.state.put(row("counter", Next=1))
    pending = client.state.put(row("p-0"))

    results = await table.transact(
        [*_accept_ops(counter), conditional("delete", row("p-0"), pending), ("upsert", row("r-0", S="ok"))]
    )

    assert results is not None
    assert results[3] is None
    assert results[:3] == [stored(client, rk).metadata["etag"] for rk in ("counter", "o-1", "p-1")]
    assert results[4] == stored(client, "r-0").metadata["etag"]
    tokens = {stored(client, rk)[WRITE_TOKEN] for rk in ("counter", "o-1", "p-1", "r-0")}
    assert len(tokens) == 1  # one token for the whole transaction
    assert client.state.read(PK, "p-0") is None


async def test_a_transaction_that_landed_after_a_lost_answer_reads_its_etags_back() -> None:
    table, client = seam()
    counter = client.state.put(row("counter", Next=1))
    client.inject(Fault.LOST, method="submit_transaction")

    results = await table.transact(_accept_ops(counter))

    assert results == [stored(client, rk).metadata["etag"] for rk in ("counter", "o-1", "p-1")]
    assert client.calls == ["submit_transaction"] + ["get_entity"] * 4  # the probe, then each row


async def test_a_transaction_that_did_not_land_is_submitted_again() -> None:
    table, client = seam()
    counter = client.state.put(row("counter", Next=1))
    client.inject(Fault.UNAVAILABLE, method="submit_transaction")

    results = await table.transact(_accept_ops(counter))

    assert results is not None and results[1] == stored(client, "o-1").metadata["etag"]
    assert client.calls == ["submit_transaction"] + ["get_entity"] * 3 + [
        "submit_transaction"
    ]  # each row read


async def test_a_transaction_whose_condition_failed_is_none_and_changes_nothing() -> None:
    table, client = seam()
    old = client.state.put(row("counter", Next=1))
    client.state.put(row("counter", Next=5))

    assert await table.transact(_accept_ops(old)) is None
    assert client.calls == ["submit_transaction"]
    assert client.state.read(PK, "o-1") is None and client.state.read(PK, "p-1") is None
    assert stored(client, "counter")["Next"] == 5


async def test_a_transaction_creating_an_existing_row_is_none() -> None:
    table, client = seam()
    counter = client.state.put(row("counter", Next=1))
    client.state.put(row("o-1", Op="theirs"))

    assert await table.transact(_accept_ops(counter)) is None
    assert stored(client, "o-1")["Op"] == "theirs"
    assert stored(client, "counter").metadata["etag"] == counter


async def test_a_404_inside_a_transaction_is_a_failed_condition() -> None:
    table, client = seam()

    ops = [conditional("delete", row("p-0"), "*"), ("upsert", row("r-0", S="ok"))]

    assert await table.transact(ops) is None
    assert client.calls == ["submit_transaction"]
    assert client.state.read(PK, "r-0") is None


async def test_a_transaction_conflict_after_a_lost_answer_that_did_not_land_is_none() -> None:
    table, client = seam()
    counter = client.state.put(row("counter", Next=1))
    client.inject(Fault.UNAVAILABLE, method="submit_transaction")
    client.inject(lambda: client.state.put(row("counter", Next=7)), method="submit_transaction")

    assert await table.transact(_accept_ops(counter)) is None
    assert client.state.read(PK, "o-1") is None
    assert client.calls == (["submit_transaction"] + ["get_entity"] * 3) * 2


async def test_a_transaction_that_landed_late_meets_its_own_rows() -> None:
    table, client = seam()
    counter = client.state.put(row("counter", Next=1))
    client.inject(Fault.LATE, method="submit_transaction")

    results = await table.transact(_accept_ops(counter))

    assert results == [stored(client, rk).metadata["etag"] for rk in ("counter", "o-1", "p-1")]


async def test_a_landed_transaction_whose_probe_row_moved_on_is_still_ours() -> None:
    table, client = seam()
    counter = client.state.put(row("counter", Next=1))
    client.inject(Fault.LOST, method="submit_transaction")
    client.inject(lambda: client.state.put(row("counter", Next=9)), method="get_entity")  # the next accept

    results = await table.transact(_accept_ops(counter))

    assert stored(client, "o-1")[WRITE_TOKEN]  # it did land
    assert results is not None


async def test_a_landed_transaction_hands_out_no_etag_of_a_row_someone_changed_since() -> None:
    """The answer is lost; before the read-back another writer changes one of its rows (a coalesced call
    marking a chunk just accepted). That row's ETag is theirs now: handed out as ours, a later
    conditional write would overwrite their change unseen, so the ETag given matches nothing."""
    table, client = seam()
    counter = client.state.put(row("counter", Next=1))
    client.inject(Fault.LOST, method="submit_transaction")
    client.inject(lambda: client.state.put(row("p-1", State="Sending")), method="get_entity")

    results = await table.transact(_accept_ops(counter))

    assert results is not None and stored(client, "o-1")[WRITE_TOKEN]  # it landed
    theirs = client.state.read(PK, "p-1")
    assert theirs is not None and CHANGED_SINCE in results and theirs.metadata["etag"] not in results
    assert await table.replace(row("p-1", State="Pending"), CHANGED_SINCE) is None  # no overwrite
    assert stored(client, "p-1")["State"] == "Sending"


async def test_a_transaction_of_deletes_only() -> None:
    table, client = seam()
    one, two = client.state.put(row("p-1")), client.state.put(row("p-2"))

    results = await table.transact(
        [conditional("delete", row("p-1"), one), conditional("delete", row("p-2"), two)]
    )

    assert results == [None, None]
    assert client.state.read(PK, "p-1") is None


# --- classification -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "conflict"),
    [
        (http_error(ResourceExistsError, 409, "EntityAlreadyExists", "exists"), True),
        (http_error(ResourceModifiedError, 412, "UpdateConditionNotSatisfied", "moved"), True),
        (http_error(TableTransactionError, 409, "EntityAlreadyExists", "1:exists"), True),
        (http_error(TableTransactionError, 412, "UpdateConditionNotSatisfied", "0:moved"), True),
        (ConditionFailed("404 in a transaction"), True),
        (HttpResponseError(message="2:The update condition ... ErrorCode:ConditionNotMet"), True),
        (http_error(ResourceNotFoundError, 404, "ResourceNotFound", "missing"), False),
        (error(503, "ServerBusy"), False),
        (ServiceResponseError("no answer"), False),
        (ValueError("EntityAlready"), False),
    ],
)
def test_is_conflict(exc: BaseException, conflict: bool) -> None:
    assert is_conflict(exc) is conflict


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ServiceRequestError("not sent"), True),
        (ServiceResponseError("no answer"), True),
        (TimeoutError(), True),
        (ConnectionResetError(), True),
        (error(500, "InternalError"), True),
        (error(503, "ServerBusy"), True),
        (error(408, "OperationTimedOut"), True),
        (error(400, "InvalidInput"), False),
        (error(403, "AuthorizationFailure"), False),
        (http_error(ResourceNotFoundError, 404, "ResourceNotFound", "missing"), False),
        (http_error(ResourceExistsError, 409, "EntityAlreadyExists", "exists"), False),
        (http_error(ResourceModifiedError, 412, "UpdateConditionNotSatisfied", "moved"), False),
        (HttpResponseError(message="no status"), False),
        (ValueError("bad"), False),
    ],
)
def test_is_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


@pytest.mark.parametrize(
    ("exc", "landed"),
    [
        (ServiceRequestError("not sent", error=aiohttp.ConnectionTimeoutError()), False),
        (ServiceRequestError("reset after sending"), True),
        (ServiceResponseError("no answer"), True),
        (TimeoutError(), True),
        (error(503, "ServerBusy"), True),
        (error(500, "InternalError"), True),
    ],
)
def test_may_have_landed(exc: BaseException, landed: bool) -> None:
    assert may_have_landed(exc) is landed


# --- the policy ---------------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_doubling_up_to_the_cap() -> None:
    policy = RetryPolicy(first_backoff=0.1, max_backoff=0.5)
    for attempt, cap in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.5), (10, 0.5)]:
        draws = [policy.backoff(attempt) for _ in range(50)]
        assert all(0 <= d <= cap for d in draws)
        assert max(draws) > 0


async def test_retries_are_bounded_by_the_deadline() -> None:
    policy = RetryPolicy(attempts=10_000, first_backoff=0.002, max_backoff=0.002, deadline=0.05)
    table, client = seam(policy)
    client.inject(Fault.NOT_SENT, method="update_entity", times=10_000)
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises(StorageUnavailable):
        await table.replace(row(V=1), None)

    assert loop.time() - started < 0.5
    assert 2 <= client.count("update_entity") < 200


async def test_reads_are_bounded_by_the_deadline() -> None:
    policy = RetryPolicy(attempts=10_000, first_backoff=0.002, max_backoff=0.002, deadline=0.05)
    table, client = seam(policy)
    client.inject(Fault.NOT_SENT, method="get_entity", times=10_000)

    with pytest.raises(StorageUnavailable):
        await table.get(PK, "a")

    assert 2 <= client.count("get_entity") < 200


async def test_no_back_off_after_the_last_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, result: Any = None) -> Any:
        slept.append(delay)
        await real_sleep(0)
        return result

    monkeypatch.setattr(asyncio, "sleep", sleep)
    table, client = seam(RetryPolicy(attempts=3, first_backoff=0.001, max_backoff=0.001, deadline=5.0))
    client.inject(Fault.NOT_SENT, times=100)

    with pytest.raises(StorageUnavailable):
        await table.get(PK, "a")
    with pytest.raises(StorageUnavailable):
        await table.insert(row())

    assert client.calls == ["get_entity"] * 3 + ["create_entity"] * 3
    assert len(slept) == 2 + 2  # between attempts only


# --- the rest of the seam -----------------------------------------------------------------------------------


async def test_name_round_trips_and_close() -> None:
    table, client = seam()
    await table.insert(row())
    await table.get(PK, "a")

    assert table.name == "alertgateOperations"
    assert table.round_trips == 2
    await table.close()
    assert client.closed


def test_conditional_builds_if_not_modified_operations() -> None:
    update = conditional("update", row(V=1), "etag-1")
    delete = conditional("delete", row(), "*")

    assert update == (
        "update",
        row(V=1),
        {"mode": UpdateMode.REPLACE, "etag": "etag-1", "match_condition": MatchConditions.IfNotModified},
    )
    assert delete == ("delete", row(), {"etag": "*", "match_condition": MatchConditions.IfNotModified})


def test_the_sdks_own_retries_are_off_and_timeouts_bounded() -> None:
    options = client_options()
    assert options["retry_total"] == 0
    assert 0 < options["connection_timeout"] <= options["read_timeout"] <= 30


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY"])
def test_storage_clients_trust_the_environment_only_when_it_names_a_proxy(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert client_options()["use_env_settings"] is False  # no ~/.netrc lookup on every request

    monkeypatch.setenv(variable, "http://proxy.example:3128")

    assert "use_env_settings" not in client_options()  # the SDK's default: proxy settings honoured
