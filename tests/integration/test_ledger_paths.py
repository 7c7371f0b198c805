"""The synchronous path's short cuts in the ledger, against Azurite (shared/ledger.py's module docstring).

- The per-alert order read *before* accepting (`look_ahead`) lets the first chunk be accepted already
  marked Sending, but only while the accept counter has not moved since the read; otherwise the request is
  accepted the ordinary way (every chunk Pending), still exactly once.
- The budget request made beside accepting is held back until the accept's transaction is on its way
  (`storage.sending_after`), so that both are in flight together.
- A chunk finished *in place* stays in its p- entry until `settle` moves it to r-; meanwhile every reader
  treats it as finished. End to end, the sweep settles what the synchronous path finished in place.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import aiohttp
from azure.data.tables.aio import TableServiceClient
from azure.storage.queue.aio import QueueClient

from devhost.services import Service
from emulators.control import EmulatorControl
from shared.idempotency import IdempotencyKey, KeyKind
from shared.ledger import AcceptPlan, ChunkResult, Ledger, PendingState
from shared.storage import Tables, client_options, sending_after
from tests.conftest import HostPool
from tests.integration.helpers import eventually, new_ids, post, wait_for_operation


def plan(*alerts: str, fields: dict[str, str] | None = None) -> AcceptPlan:
    return AcceptPlan(str(uuid.uuid4()), "http", {}, [(alerts, fields or {"status": "Resolved"})], "digest")


async def row_keys(tables: Tables) -> list[str]:
    return [
        e["RowKey"]
        for e in await tables.operations.query("PartitionKey eq @pk", {"pk": "ledger"}, ["RowKey"])
    ]


async def test_look_ahead_needs_a_cached_counter_and_sees_pending_alerts(tables: Tables) -> None:
    ledger = Ledger(tables.operations)
    assert await ledger.look_ahead(["a1"]) is None  # nothing accepted by this process yet

    await ledger.accept(plan("a1", "a2"))
    clear = await ledger.look_ahead(["a3"])
    blocked = await ledger.look_ahead(["a2", "a9"])
    assert clear is not None and not clear.blocked
    assert blocked is not None and blocked.blocked


async def test_a_clear_view_accepts_the_first_chunk_marked_sending(tables: Tables) -> None:
    ledger = Ledger(tables.operations)
    await ledger.accept(plan("b1"))
    view = await ledger.look_ahead(["b2"])

    operation, (chunk,) = await ledger.accept(plan("b2"), view)

    assert (chunk.state, chunk.attempts) == (PendingState.SENDING, 1)
    stored = await ledger.pending_chunk(chunk.chunk_id)
    assert stored is not None and stored.state == PendingState.SENDING and stored.sending_since > 0
    assert operation.first_seq == chunk.seq == 2


async def test_a_blocked_view_accepts_pending(tables: Tables) -> None:
    ledger = Ledger(tables.operations)
    await ledger.accept(plan("c1"))
    view = await ledger.look_ahead(["c1"])

    _, (chunk,) = await ledger.accept(plan("c1", fields={"status": "New"}), view)

    assert chunk.state == PendingState.PENDING and chunk.attempts == 0


async def test_a_view_outdated_by_another_instance_falls_back_to_pending(tables: Tables) -> None:
    """Another instance accepts an update of the same alert between the read and the accept: the view
    missed it, so using it would send ahead of that update. The counter moved, so it is not used."""
    mine, other = Ledger(tables.operations), Ledger(tables.operations)
    await mine.accept(plan("d0"))
    view = await mine.look_ahead(["d1"])
    assert view is not None and not view.blocked
    _, (theirs,) = await other.accept(plan("d1", fields={"status": "InProgress"}))

    operation, (chunk,) = await mine.accept(plan("d1"), view)

    assert chunk.state == PendingState.PENDING
    assert chunk.seq == theirs.seq + 1 == operation.first_seq
    blocker = (await mine.view_ahead_of(chunk)).blocker(chunk)
    assert blocker is not None and blocker.chunk_id == theirs.chunk_id


async def test_a_view_outdated_by_this_process_is_not_used(tables: Tables) -> None:
    """Two requests of one process: the second accept happens after the first's view was read."""
    ledger = Ledger(tables.operations)
    await ledger.accept(plan("e0"))
    view = await ledger.look_ahead(["e1"])
    await ledger.accept(plan("e1", fields={"status": "InProgress"}))

    _, (chunk,) = await ledger.accept(plan("e1"), view)

    assert chunk.state == PendingState.PENDING


async def test_finished_in_place_reads_as_finished_until_settled(tables: Tables) -> None:
    ledger = Ledger(tables.operations)
    await ledger.accept(plan("f0"))
    operation, (chunk,) = await ledger.accept(plan("f1"), await ledger.look_ahead(["f1"]))

    done = await ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None, in_place=True)

    assert f"p-{chunk.chunk_id}" in await row_keys(tables)
    assert await ledger.pending_chunk(chunk.chunk_id) is None
    view = await ledger.look_ahead(["f1"])
    assert view is not None and not view.blocked
    _, (later,) = await ledger.accept(plan("f1", fields={"status": "New"}))
    assert (await ledger.view_ahead_of(later)).blocker(later) is None
    (reported,) = await ledger.chunks_of(operation)
    assert (reported.state, reported.answer_status) == (ChunkResult.SUCCEEDED, 200)
    assert [c.chunk_id for c in await ledger.all_pending() if c.finished] == [chunk.chunk_id]

    assert await ledger.settle(done) is True
    assert await ledger.settle(done) is False  # someone settled it already: nothing to do
    keys = await row_keys(tables)
    assert f"p-{chunk.chunk_id}" not in keys and f"r-{chunk.chunk_id}" in keys
    (settled,) = await ledger.chunks_of(operation)
    assert (settled.state, settled.answer_status) == (ChunkResult.SUCCEEDED, 200)
    again = await ledger.finish(chunk, ChunkResult.FAILED, 502, None, in_place=True)
    assert again.state == ChunkResult.SUCCEEDED  # a second finish returns the first


async def test_the_sweep_settles_what_the_synchronous_path_finished(
    hosts: HostPool, own_hosts: list[Service], azurite: Service, http: aiohttp.ClientSession
) -> None:
    host, env = hosts.fresh(SWEEP_SCHEDULE="*/1 * * * * *")
    own_hosts.append(host)
    url = host.urls["base"] + "/api/alerts/batchUpdate"
    first = new_ids(1)
    assert (await post(http, url, {"alertIds": first, "status": "InProgress"}))[0] == 200  # warms the counter
    status, headers, body = await post(http, url, {"alertIds": new_ids(1), "status": "Resolved"})
    assert status == 200, body

    service = TableServiceClient.from_connection_string(azurite.urls["connection_string"])
    async with service, service.get_table_client(f"{env['TABLE_PREFIX']}Operations") as table:

        async def settled() -> bool:
            keys = [e["RowKey"] async for e in table.list_entities(select=["RowKey"])]
            return not any(k.startswith("p-") for k in keys) and sum(k.startswith("r-") for k in keys) == 2

        await eventually(settled, 10.0, "both chunks moved from p- to r- by the sweep")
        results = [e async for e in table.query_entities("RowKey ge 'r-' and RowKey lt 'r.'")]
    assert {json.loads(e["AlertIds"])[0]: e["State"] for e in results}[first[0]] == "Succeeded"
    # Both ended while their caller waited (the first without the look-ahead: no counter cached yet), so
    # both were recorded in place and moved by the sweep (in one run of it or two).
    runs = re.findall(
        r"sweep settled (\d+) chunks finished on the synchronous path", host.log_path.read_text()
    )
    assert sum(int(n) for n in runs) == 2, runs
    code, document = await wait_for_operation(http, headers["Location"])
    assert code == 200 and document["status"] == "Succeeded"


async def test_a_synchronous_answer_is_kept_in_the_ledger_and_replayed_from_there(
    hosts: HostPool,
    own_hosts: list[Service],
    azurite: Service,
    ctl: EmulatorControl,
    http: aiohttp.ClientSession,
) -> None:
    """A one-chunk request answered within the call keeps its answer with the chunk's end, not in its
    key (one write fewer while the caller waits). The first replay gets exactly that answer, marked a
    replay, nothing is sent again, and the key is completed from it; a different body is still a 422."""
    host, env = hosts.fresh()
    own_hosts.append(host)
    url = host.urls["base"] + "/api/alerts/batchUpdate"
    body = {"alertIds": new_ids(1), "status": "Resolved", "comment": "closed by the playbook"}
    key = f"run-{uuid.uuid4()}"
    status, headers, first = await post(http, url, body, {"Idempotency-Key": key})
    assert status == 200, first

    service = TableServiceClient.from_connection_string(azurite.urls["connection_string"])
    async with service, service.get_table_client(f"{env['TABLE_PREFIX']}Keys") as keys:
        partition = IdempotencyKey(KeyKind.EXPLICIT, key).partition_key
        record = await keys.get_entity(partition, "key")
        assert record["State"] == "InProgress" and "ResponseBody" not in record

        again, replay_headers, replayed = await post(http, url, body, {"Idempotency-Key": key})
        assert (again, replayed) == (200, first)
        assert replay_headers["Idempotent-Replayed"] == "true"
        assert replay_headers["Location"] == headers["Location"]
        assert len([c for c in await ctl.calls() if c["json"]["alertIds"] == body["alertIds"]]) == 1
        record = await keys.get_entity(partition, "key")
        assert record["State"] == "Completed" and json.loads(record["ResponseBody"]) == first

    other, _, problem = await post(http, url, {**body, "status": "New"}, {"Idempotency-Key": key})
    assert other == 422 and problem["errors"][0]["field"] == "Idempotency-Key"


async def test_a_rider_s_202_is_kept_with_its_operation_and_replayed_from_there(
    hosts: HostPool,
    own_hosts: list[Service],
    azurite: Service,
    ctl: EmulatorControl,
    http: aiohttp.ClientSession,
) -> None:
    """A request that rides a call its instance gathers is answered 202 at once, and that answer is
    written with its operation as it is accepted: its key keeps only the claim, and it has no queue
    message. A repeat gets exactly that 202, marked a replay, nothing is sent again, and the key is
    completed from it."""
    # the lead waits for the next slot (about 5 s away) instead of being queued: a call that gathers
    host, env = hosts.fresh(
        DEFENDER_RATE_LIMITS="1/4", DEFENDER_PATCH_RATE_LIMITS="off", SYNC_MAX_WAIT_SECONDS="10"
    )
    own_hosts.append(host)
    url = host.urls["base"] + "/api/alerts/batchUpdate"
    spent = await post(http, url, {"alertIds": new_ids(2), "status": "Resolved"})
    assert spent[0] == 200, spent  # the window's only call
    comment = f"closed by a script {uuid.uuid4()}"
    lead_ids, rider_ids = new_ids(1), new_ids(1)
    leading = asyncio.ensure_future(
        post(http, url, {"alertIds": lead_ids, "status": "Resolved", "comment": comment})
    )
    service = TableServiceClient.from_connection_string(azurite.urls["connection_string"])
    async with (
        service,
        service.get_table_client(f"{env['TABLE_PREFIX']}Operations") as operations,
        service.get_table_client(f"{env['TABLE_PREFIX']}Keys") as keys,
    ):

        async def lead_accepted() -> bool:
            rows = [e async for e in operations.query_entities("RowKey ge 'p-' and RowKey lt 'p.'")]
            return any(json.loads(e["AlertIds"]) == lead_ids for e in rows)

        await eventually(lead_accepted, 10.0, "the lead request accepted")
        await asyncio.sleep(1.0)  # its try reads the order and opens its call, which waits for the slot
        body = {"alertIds": rider_ids, "status": "Resolved", "comment": comment}
        key = f"run-{uuid.uuid4()}"
        status, headers, first = await post(http, url, body, {"Idempotency-Key": key})
        assert status == 202, first
        assert not leading.done()  # answered while the call it rides still waits for its slot
        async with QueueClient.from_connection_string(
            azurite.urls["connection_string"], env["CHUNKS_QUEUE"]
        ) as chunks_queue:  # a rider just accepted has no message: the call's try answers for it
            assert (await chunks_queue.get_queue_properties()).approximate_message_count == 0

        record = await keys.get_entity(IdempotencyKey(KeyKind.EXPLICIT, key).partition_key, "key")
        assert record["State"] == "InProgress" and "ResponseBody" not in record
        operation = await operations.get_entity("ledger", f"o-{first['operationId']}")
        assert json.loads(json.loads(operation["Answer"])["body"]) == first

        again, replay_headers, replayed = await post(http, url, body, {"Idempotency-Key": key})
        assert (again, replayed) == (202, first)
        assert replay_headers["Idempotent-Replayed"] == "true"
        assert replay_headers["Location"] == headers["Location"]
        record = await keys.get_entity(IdempotencyKey(KeyKind.EXPLICIT, key).partition_key, "key")
        assert record["State"] == "Completed" and json.loads(record["ResponseBody"]) == first

    assert (await leading)[0] == 200
    code, document = await wait_for_operation(http, headers["Location"], within=40)
    assert code == 200 and document["status"] == "Succeeded"
    state = await ctl.alert(rider_ids[0])
    assert state is not None and state["comments"] == [comment]
    assert len([c for c in await ctl.calls() if rider_ids[0] in c["json"]["alertIds"]]) == 1


async def test_a_request_made_sending_after_an_event_leaves_only_once_it_is_set(azurite: Service) -> None:
    """A write made under `sending_after` is built at once but sent only once the event is set: a write
    of the same row made meanwhile, not held back, lands first, and the held insert finds the row there."""
    service = TableServiceClient.from_connection_string(azurite.urls["connection_string"], **client_options())
    tables = Tables.from_service(service, f"s{uuid.uuid4().hex[:10]}")
    await tables.ensure_exist(service)
    row = {"PartitionKey": "held", "RowKey": "r1"}
    gate = asyncio.Event()

    async def held() -> str | None:
        with sending_after(gate):
            return await tables.operations.insert({**row, "By": "held"})

    waiting = asyncio.ensure_future(held())
    for _ in range(20):  # time enough for an insert on loopback, well within SEND_AFTER_MAX_SECONDS
        await asyncio.sleep(0.01)
    assert not waiting.done()
    assert await tables.operations.insert({**row, "By": "direct"}) is not None
    gate.set()
    assert await waiting is None  # it went second: the row was there
    stored = await tables.operations.get("held", "r1")
    assert stored is not None and stored["By"] == "direct"
    await service.close()
