"""MemoryTable keeps the StateStore promises StateTable keeps over Table Storage, so unit tests of the
ledger, intake and sender can trust what it answers: ETags, conditions, atomic transactions, the
SDK's value conversions, and each $filter shape that shared/ sends."""

from __future__ import annotations

import enum
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.data.tables import EdmType, EntityProperty, TableEntity, TableTransactionError, UpdateMode

from shared.errors import StorageUnavailable
from shared.ledger import _UNFINISHED_RANGE, _unfinished
from shared.storage import StateStore, conditional
from tests.fakes import MemoryTable, compile_filter

PK = "ledger"


def row(rk: str, **props: Any) -> dict[str, Any]:
    return {"PartitionKey": PK, "RowKey": rk, **props}


async def got(table: MemoryTable, rk: str) -> TableEntity:
    entity = await table.get(PK, rk)
    assert entity is not None, f"{rk} is missing"
    return entity


def etag_of(entity: TableEntity | None) -> str:
    assert entity is not None
    return str(entity.metadata["etag"])


def test_it_is_a_state_store() -> None:
    store: StateStore = MemoryTable("alertgateKeys")
    assert store.name == "alertgateKeys"


# --- single rows ----------------------------------------------------------------------------------------


async def test_insert_gives_an_etag_and_get_returns_the_entity_with_it() -> None:
    table = MemoryTable()

    etag = await table.insert(row("a", V=1))
    entity = await table.get(PK, "a")

    assert etag is not None
    assert isinstance(entity, TableEntity)
    assert dict(entity) == row("a", V=1)
    assert etag_of(entity) == etag


async def test_insert_of_an_existing_row_is_none_and_leaves_it() -> None:
    table = MemoryTable()
    await table.insert(row("a", V=1))

    assert await table.insert(row("a", V=2)) is None
    assert (await got(table, "a"))["V"] == 1


async def test_every_write_gets_a_new_etag() -> None:
    table = MemoryTable()
    first = await table.insert(row("a", V=1))
    second = await table.replace(row("a", V=2), first)
    third = await table.replace(row("a", V=3), None)
    other = await table.insert(row("b"))

    assert len({first, second, third, other}) == 4


async def test_get_of_a_missing_row_is_none() -> None:
    assert await MemoryTable().get(PK, "nothing") is None


async def test_entities_returned_are_copies() -> None:
    table = MemoryTable()
    await table.insert(row("a", V=1))
    entity = await table.get(PK, "a")
    assert entity is not None
    entity["V"] = 99

    assert (await got(table, "a"))["V"] == 1


async def test_replace_if_unchanged() -> None:
    table = MemoryTable()
    etag = await table.insert(row("a", V=1, Gone="x"))

    new = await table.replace(row("a", V=2), etag)

    assert new is not None and new != etag
    assert dict(await got(table, "a")) == row("a", V=2)  # replaced, not merged
    assert await table.replace(row("a", V=3), etag) is None  # the old ETag no longer matches
    assert (await got(table, "a"))["V"] == 2


async def test_replace_of_a_missing_row_is_none_with_or_without_an_etag() -> None:
    table = MemoryTable()
    etag = await table.insert(row("a"))
    await table.delete(PK, "a")

    assert await table.replace(row("a", V=1), etag) is None
    assert await table.replace(row("a", V=1), None) is None
    assert await table.get(PK, "a") is None


async def test_unconditional_replace_ignores_the_etag() -> None:
    table = MemoryTable()
    await table.insert(row("a", V=1))
    table.put(row("a", V=5))  # someone else

    assert await table.replace(row("a", V=2), None) is not None
    assert (await got(table, "a"))["V"] == 2


async def test_delete() -> None:
    table = MemoryTable()
    old = await table.insert(row("a", V=1))
    current = await table.replace(row("a", V=2), old)

    assert await table.delete(PK, "a", old) is False
    assert await table.get(PK, "a") is not None
    assert await table.delete(PK, "a", current) is True
    assert await table.get(PK, "a") is None
    assert await table.delete(PK, "a") is True  # missing counts as deleted
    assert await table.delete(PK, "a", current) is True


# --- values as the SDK and the service treat them -------------------------------------------------------


class Colour(enum.StrEnum):
    RED = "Red"


async def test_values_come_back_as_azure_returns_them() -> None:
    table = MemoryTable()
    await table.insert(
        row(
            "a",
            Nothing=None,
            State=Colour.RED,
            Big=EntityProperty(2**40, EdmType.INT64),
            Small=7,
            Ratio=0.5,
            Flag=True,
            Blob=b"\x00\x01",
        )
    )
    entity = await table.get(PK, "a")
    assert entity is not None

    assert "Nothing" not in entity  # the SDK does not send None
    assert entity["State"] == "Red" and type(entity["State"]) is str
    assert entity["Big"] == EntityProperty(2**40, EdmType.INT64)
    assert (entity["Small"], entity["Ratio"], entity["Flag"], entity["Blob"]) == (7, 0.5, True, b"\x00\x01")


async def test_an_int_beyond_int32_is_refused_like_the_sdk_does() -> None:
    with pytest.raises(TypeError, match="Int32"):
        await MemoryTable().insert(row("a", Ms=1_700_000_000_000))


async def test_a_string_over_64_kib_is_refused_like_the_service_does() -> None:
    table = MemoryTable()
    with pytest.raises(HttpResponseError) as raised:
        await table.insert(row("a", Text="x" * 32_769))
    assert raised.value.status_code == 400
    assert await table.insert(row("a", Text="x" * 32_768)) is not None


async def test_keys_with_forbidden_characters_are_refused() -> None:
    with pytest.raises(HttpResponseError) as raised:
        await MemoryTable().insert(row("a/b"))
    assert raised.value.status_code == 400


# --- transactions ---------------------------------------------------------------------------------------


async def test_a_transaction_applies_every_kind_and_returns_etags() -> None:
    table = MemoryTable()
    counter = await table.insert(row("counter", Next=1))
    pending = await table.insert(row("p-1", State="Pending"))
    await table.insert(row("r-0", A=1, B=1))

    results = await table.transact(
        [
            conditional("update", row("counter", Next=2), counter),
            ("create", row("o-1", Op="x")),
            conditional("delete", row("p-1"), pending),
            ("upsert", row("r-1", State="Succeeded")),
            ("upsert", row("r-0", B=2)),  # default mode: merge
        ]
    )

    assert results is not None
    assert results[2] is None
    for rk, etag in zip(("counter", "o-1", None, "r-1", "r-0"), results, strict=True):
        if rk is not None:
            assert etag == etag_of(await table.get(PK, rk))
    assert await table.get(PK, "p-1") is None
    assert dict(await got(table, "r-0")) == row("r-0", A=1, B=2)


async def test_a_transaction_is_all_or_nothing() -> None:
    table = MemoryTable()
    counter = await table.insert(row("counter", Next=1))
    await table.insert(row("o-1", Op="theirs"))
    before = table.rows()

    results = await table.transact(
        [
            conditional("update", row("counter", Next=2), counter),
            ("create", row("j-1")),
            ("create", row("o-1", Op="ours")),  # exists: the whole transaction fails
        ]
    )

    assert results is None
    assert [(dict(e), e.metadata["etag"]) for e in table.rows()] == [
        (dict(e), e.metadata["etag"]) for e in before
    ]


@pytest.mark.parametrize(
    "op",
    [
        conditional("update", row("counter", Next=2), 'W/"stale"'),
        conditional("delete", row("counter"), 'W/"stale"'),
        conditional("delete", row("missing"), "*"),  # must exist in a transaction
        ("update", row("missing", V=1)),
        ("create", row("counter")),
    ],
)
async def test_a_failed_condition_in_a_transaction_is_none(op: Any) -> None:
    table = MemoryTable()
    await table.insert(row("counter", Next=1))

    assert await table.transact([op, ("create", row("o-1"))]) is None
    assert await table.get(PK, "o-1") is None


async def test_delete_star_in_a_transaction_matches_any_existing_row() -> None:
    table = MemoryTable()
    await table.insert(row("p-1"))
    table.put(row("p-1", Moved=True))

    assert await table.transact([conditional("delete", row("p-1"), "*"), ("create", row("r-1"))]) is not None
    assert await table.get(PK, "p-1") is None


async def test_update_in_a_transaction_merges_by_default_and_replaces_on_request() -> None:
    table = MemoryTable()
    await table.insert(row("a", A=1, B=1))
    await table.insert(row("b", A=1, B=1))

    await table.transact([("update", row("a", B=2)), ("update", row("b", B=2), {"mode": UpdateMode.REPLACE})])

    assert dict(await got(table, "a")) == row("a", A=1, B=2)
    assert dict(await got(table, "b")) == row("b", B=2)


async def test_transactions_refuse_what_the_sdk_and_the_service_refuse() -> None:
    table = MemoryTable()
    await table.insert(row("a"))

    with pytest.raises(ValueError, match="Partition Keys"):
        await table.transact([("create", row("x")), ("create", {"PartitionKey": "other", "RowKey": "y"})])
    with pytest.raises(ValueError, match="IfNotModified must be specified with etag"):
        await table.transact([conditional("delete", row("a"), None)])
    with pytest.raises(ValueError, match="Unconditional"):
        await table.transact([("update", row("a"), {"etag": "x"})])
    with pytest.raises(TableTransactionError) as duplicate:
        await table.transact([("upsert", row("x")), ("delete", row("x"))])
    assert duplicate.value.status_code == 400
    with pytest.raises(TableTransactionError) as too_many:
        await table.transact([("create", row(f"x{n}")) for n in range(101)])
    assert too_many.value.status_code == 400
    assert table.size() == 1


# --- queries --------------------------------------------------------------------------------------------


async def _ledger_rows(table: MemoryTable) -> None:
    rows: list[tuple[str, dict[str, Any]]] = [
        ("counter", {"Next": 4}),
        ("j-000000000001", {"Digest": "A", "AcceptedAt": 10.0}),
        ("j-000000000002", {"Digest": "B", "AcceptedAt": 20.0}),
        ("j-000000000003", {"Digest": "A", "AcceptedAt": 30.0}),
        ("o-op1", {"CreatedAt": 10.0}),
        ("o-op2", {"CreatedAt": 30.0}),
        ("p-000000000002", {"State": "Pending", "AlertIds": '["x"]'}),
        ("p-000000000003", {"State": "Sending", "AlertIds": '["y"]'}),
        ("p-000000000003-000", {"State": "Succeeded", "AlertIds": '["y"]'}),
        ("r-000000000001", {"State": "Succeeded", "FinishedAt": 10.0}),
    ]
    for rk, props in rows:
        await table.insert(row(rk, **props))
    await table.insert({"PartitionKey": "other", "RowKey": "p-000000000001", "State": "Pending"})


async def keys(table: MemoryTable, query: str, **params: Any) -> list[str]:
    return [str(e["RowKey"]) for e in await table.query(query, params)]


async def test_query_range_in_one_partition_in_key_order() -> None:
    table = MemoryTable()
    await _ledger_rows(table)

    found = await keys(
        table, "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi", pk=PK, lo="p-", hi="p."
    )

    assert found == ["p-000000000002", "p-000000000003", "p-000000000003-000"]


async def test_query_unfinished_range_with_parenthesised_or() -> None:
    table = MemoryTable()
    await _ledger_rows(table)

    everything = await table.query(_UNFINISHED_RANGE, _unfinished(PK, "p-", "p."), select=["AlertIds"])
    before_three = await table.query(_UNFINISHED_RANGE, _unfinished(PK, "p-", "p-000000000003"))

    assert [e["AlertIds"] for e in everything] == ['["x"]', '["y"]']  # the finished piece is skipped
    assert all(set(e) == {"AlertIds"} for e in everything)
    assert [e["RowKey"] for e in before_three] == ["p-000000000002"]


@pytest.mark.parametrize(
    ("lo", "hi", "stamp", "before", "expected"),
    [
        ("o-", "o.", "CreatedAt", 20.0, ["o-op1"]),
        ("r-", "r.", "FinishedAt", 20.0, ["r-000000000001"]),
        ("j-", "j.", "AcceptedAt", 25.0, ["j-000000000001", "j-000000000002"]),
        ("j-", "j.", "AcceptedAt", 5.0, []),
    ],
)
async def test_query_purge_ranges_with_a_time_stamp(
    lo: str, hi: str, stamp: str, before: float, expected: list[str]
) -> None:
    table = MemoryTable()
    await _ledger_rows(table)

    query = f"PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi and {stamp} lt @before"

    assert await keys(table, query, pk=PK, lo=lo, hi=hi, before=before) == expected


async def test_query_exclusive_lower_bound_for_the_journal() -> None:
    table = MemoryTable()
    await _ledger_rows(table)

    found = await keys(
        table, "PartitionKey eq @pk and RowKey gt @lo and RowKey lt @hi", pk=PK, lo="j-000000000001", hi="j."
    )

    assert found == ["j-000000000002", "j-000000000003"]


async def test_query_across_partitions_and_select() -> None:
    table = MemoryTable()
    for n, expires in enumerate([5.0, 50.0, 15.0]):
        await table.insert({"PartitionKey": f"k-{n}", "RowKey": "key", "ExpiresAt": expires, "Body": "b"})
    await table.insert({"PartitionKey": "k-9", "RowKey": "key"})  # no ExpiresAt: never matches

    found = await table.query("ExpiresAt lt @before", {"before": 20.0}, ["PartitionKey", "RowKey"])

    assert [dict(e) for e in found] == [
        {"PartitionKey": "k-0", "RowKey": "key"},
        {"PartitionKey": "k-2", "RowKey": "key"},
    ]


@pytest.mark.parametrize(
    ("query", "params", "matches"),
    [
        ("N eq @n", {"n": 3}, True),
        ("N ne @n", {"n": 3}, False),
        ("N le @n and N ge @n", {"n": 3}, True),
        ("N gt @n", {"n": 2.5}, True),  # numbers compare across Int32 and Double
        ("not ( N eq @n )", {"n": 3}, False),
        ("( N eq @a or N eq @b ) and S eq @s", {"a": 1, "b": 3, "s": "x"}, True),
        ("N eq @a or N eq @b and S eq @s", {"a": 3, "b": 1, "s": "nope"}, True),  # and binds tighter
        ("S eq 'x' and N eq 3", {}, True),  # literals in the filter
        ("S eq @n", {"n": 3}, False),  # a property of another type never matches
        ("Missing ne @n", {"n": 3}, False),  # nor does a missing one, not even ne
        ("Big eq @big", {"big": 2**40}, True),  # Edm.Int64 compares by value
    ],
)
def test_filter_evaluator(query: str, params: dict[str, Any], matches: bool) -> None:
    props = {"N": 3, "S": "x", "Big": EntityProperty(2**40, EdmType.INT64)}
    assert compile_filter(query, params)(props) is matches


def test_filter_reads_parameters_the_way_the_sdk_substitutes_them() -> None:
    with pytest.raises(KeyError):  # the SDK splits at spaces: "@b)" is not the parameter "b"
        compile_filter("( N eq @a or N eq @b)", {"a": 1, "b": 2})
    with pytest.raises(ValueError, match="two spaces"):
        compile_filter("N eq  @a", {"a": 1})
    # The SDK renders 0 and 1 as false and true (`value in [True, False]`): they never match a number.
    assert compile_filter("N eq @n", {"n": 1})({"N": 1}) is False
    assert compile_filter("N eq @n", {"n": 1})({"N": True}) is True


# --- bookkeeping and faults -----------------------------------------------------------------------------


async def test_round_trips_count_every_call_a_transaction_once() -> None:
    table = MemoryTable()
    await table.insert(row("a"))
    await table.get(PK, "a")
    await table.query("PartitionKey eq @pk", {"pk": PK})
    await table.transact([("create", row("b")), ("create", row("c"))])
    table.peek(PK, "a")

    assert table.round_trips == 4
    assert table.calls == {"insert": 1, "get": 1, "query": 1, "transact": 1}


async def test_fail_next_raises_storage_unavailable_without_applying() -> None:
    table = MemoryTable()
    table.fail_next("insert", 2)

    for _ in range(2):
        with pytest.raises(StorageUnavailable):
            await table.insert(row("a"))
    assert table.peek(PK, "a") is None
    assert await table.insert(row("a")) is not None
    assert table.injected == 2


async def test_fail_next_landed_applies_the_write_then_raises() -> None:
    table = MemoryTable()
    table.fail_next("transact", landed=True)

    with pytest.raises(StorageUnavailable):
        await table.transact([("create", row("a")), ("create", row("b"))])

    assert table.peek(PK, "a") is not None and table.peek(PK, "b") is not None


async def test_fail_next_by_kind_and_with_a_given_exception() -> None:
    table = MemoryTable()
    boom = RuntimeError("boom")
    table.fail_next("write", 1, exc=boom)

    assert await table.get(PK, "a") is None  # a read is not a write: untouched
    with pytest.raises(RuntimeError) as raised:
        await table.delete(PK, "a")
    assert raised.value is boom
    table.fail_next("read", 1)
    assert await table.insert(row("a")) is not None
    with pytest.raises(StorageUnavailable):
        await table.query("PartitionKey eq @pk", {"pk": PK})
    with pytest.raises(ValueError):
        table.fail_next("upsert")
