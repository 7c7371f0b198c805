"""devhost.faultproxy: framing, keep-alive, each fault, the seeded drops, and the classification of
alertgate's real storage writes (through the proxy to the session's Azurite).

Most cases run against a tiny aiohttp server on loopback standing in for Azurite; each takes well under
a second.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from azure.data.tables.aio import TableServiceClient
from azure.storage.queue.aio import QueueClient

from devhost.faultproxy import (
    FaultPlan,
    FaultProxy,
    Message,
    classify,
    endpoints_of,
    proxied_connection_string,
    read_body,
    read_head,
    start_faultproxy,
)
from devhost.services import LOOPBACK, Service, free_port
from shared.idempotency import ClaimOutcome, IdempotencyKey, IdempotencyStore, KeyKind, StoredResponse
from shared.ledger import AcceptPlan, ChunkResult, Ledger, PendingState
from shared.ratelimit import Grant, RateLimiter
from shared.settings import RateWindow
from shared.storage import Tables


@dataclass
class Upstream:
    """A stand-in for Azurite: records every request, answers by path."""

    port: int
    seen: list[tuple[str, str, bytes]] = field(default_factory=list)


async def _handle(upstream: Upstream, request: web.Request) -> web.StreamResponse:
    body = await request.read()
    upstream.seen.append((request.method, request.path_qs, body))
    if request.path.endswith("/chunked"):
        response = web.StreamResponse(status=200)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for piece in (b"first ", b"second ", b"third"):
            await response.write(piece)
        await response.write_eof()
        return response
    if request.method == "HEAD" or request.path.endswith("/empty"):
        return web.Response(status=204)
    return web.json_response({"method": request.method, "length": len(body)}, status=201)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    port = free_port()
    stand_in = Upstream(port)
    app = web.Application()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await _handle(stand_in, request)

    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, port).start()
    yield stand_in
    await runner.cleanup()


@pytest.fixture
async def proxy(upstream: Upstream) -> AsyncIterator[FaultProxy]:
    async with FaultProxy({"table": upstream.port, "queue": upstream.port}) as started:
        yield started


async def raw_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: str, body: bytes = b""
) -> Message | None:
    """Send one request on an open connection and read its answer (None if the connection ended)."""
    writer.write(head.encode("latin-1") + body)
    await writer.drain()
    response = await asyncio.wait_for(read_head(reader), 5.0)
    if response is not None:
        await read_body(reader, response)
    return response


def post_head(path: str, body: bytes, extra: str = "") -> str:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"


# --- forwarding ------------------------------------------------------------------------------------


async def test_forwards_both_framings_and_keeps_the_client_connection_alive(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.ports["table"])
    try:
        fixed = await raw_request(reader, writer, post_head("/acct/tOperations", b'{"a": 1}'), b'{"a": 1}')
        assert fixed is not None and fixed.start.startswith("HTTP/1.1 201")
        assert json.loads(fixed.body) == {"method": "POST", "length": 8}
        assert fixed.header("Connection") is None  # Azurite was told close; the client is kept alive

        chunked_body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        head = "PUT /acct/tBudget(PartitionKey='mde',RowKey='calls') HTTP/1.1\r\nHost: x\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n"
        answer = await raw_request(reader, writer, head, chunked_body)
        assert answer is not None and json.loads(answer.body) == {"method": "PUT", "length": 11}

        streamed = await raw_request(reader, writer, "GET /acct/chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        assert streamed is not None and streamed.body == b"first second third"
        assert streamed.has_token("Transfer-Encoding", "chunked")

        empty = await raw_request(reader, writer, "HEAD /acct/x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert empty is not None and empty.start.startswith("HTTP/1.1 204")
    finally:
        writer.close()
    assert [s[2] for s in upstream.seen[:2]] == [b'{"a": 1}', b"hello world"]
    assert proxy.accepted["table"] == 1, "four requests on one client connection"
    assert proxy.faults == []


async def test_an_aiohttp_client_reuses_its_connection_through_the_proxy(proxy: FaultProxy) -> None:
    async with aiohttp.ClientSession() as http:
        for n in range(5):
            async with http.post(
                f"http://{LOOPBACK}:{proxy.ports['queue']}/acct/q{n}/messages", data=b"m"
            ) as r:
                assert r.status == 201
    assert proxy.accepted["queue"] == 1
    assert proxy.requests[("queue", "enqueue")] == 5


# --- faults ----------------------------------------------------------------------------------------


async def test_idle_close_ends_an_idle_connection_with_a_fin(proxy: FaultProxy) -> None:
    proxy.set_plan(FaultPlan(idle_close_after=0.2))
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.ports["table"])
    try:
        await raw_request(
            reader, writer, "GET /acct/tKeys(PartitionKey='k-1',RowKey='key') HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(1), 2.0) == b""  # EOF: closed cleanly
        assert 0.15 < time.monotonic() - started < 1.0
    finally:
        writer.close()
    (fault,) = proxy.faults
    assert fault.kind == "idle-close" and fault.request is not None and fault.request.op == "read-key"


async def test_idle_close_with_rst_resets_the_connection(proxy: FaultProxy) -> None:
    proxy.set_plan(FaultPlan(idle_close_after=0.2, idle_close_rst=True))
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.ports["table"])
    try:
        await raw_request(reader, writer, "GET /acct/tKeys() HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 2.0)
    finally:
        writer.close()
    assert [f.kind for f in proxy.faults] == ["idle-close"]


async def test_a_busy_connection_is_not_idle(proxy: FaultProxy) -> None:
    """Requests closer together than the idle timeout keep the connection."""
    proxy.set_plan(FaultPlan(idle_close_after=0.3))
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.ports["table"])
    try:
        for _ in range(6):
            answer = await raw_request(reader, writer, "GET /acct/tKeys() HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer is not None
            await asyncio.sleep(0.1)
    finally:
        writer.close()
    assert proxy.faults == []


async def test_blackhole_swallows_the_next_request_after_idle(proxy: FaultProxy, upstream: Upstream) -> None:
    proxy.set_plan(FaultPlan(blackhole_after=0.2))
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.ports["table"])
    try:
        assert await raw_request(reader, writer, "GET /acct/tKeys() HTTP/1.1\r\nHost: x\r\n\r\n") is not None
        await asyncio.sleep(0.3)
        body = b'{"PartitionKey": "k-abc", "RowKey": "key", "State": "InProgress"}'
        writer.write(post_head("/acct/tKeys", body).encode() + body)
        await writer.drain()
        with pytest.raises(TimeoutError):  # no answer, no close: the client has to give up by itself
            await asyncio.wait_for(reader.read(1), 1.0)
    finally:
        writer.close()
    assert len(upstream.seen) == 1, "the swallowed request never reached Azurite"
    (fault,) = proxy.faults
    assert fault.kind == "blackhole" and fault.request is not None
    assert (fault.request.op, fault.request.keys) == ("claim", (("k-abc", "key"),))


async def test_drop_applies_the_request_and_resets_the_client(proxy: FaultProxy, upstream: Upstream) -> None:
    proxy.set_plan(FaultPlan(drop_probability=1.0))
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.ports["table"])
    body = b'{"PartitionKey": "k-abc", "RowKey": "key", "State": "InProgress"}'
    try:
        writer.write(post_head("/acct/tKeys", body).encode() + body)
        await writer.drain()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 2.0)
    finally:
        writer.close()
    assert upstream.seen == [("POST", "/acct/tKeys", body)], "the request was applied"
    (fault,) = proxy.faults
    assert fault.kind == "drop" and fault.upstream_status == 201 and fault.request is not None
    assert fault.request.op == "claim"


async def test_drops_follow_the_seed_and_the_op_filter(proxy: FaultProxy) -> None:
    async def pattern(seed: int) -> list[bool]:
        proxy.set_plan(FaultPlan(drop_probability=0.5, seed=seed, drop_ops=frozenset({"read-key"})))
        proxy.clear()
        dropped = []
        for n in range(12):
            path = f"/acct/tKeys(PartitionKey='k-{n}',RowKey='key')" if n % 2 else "/acct/tKeys()"
            reader, writer = await asyncio.open_connection(LOOPBACK, proxy.ports["table"])
            try:
                answer = await raw_request(reader, writer, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
            except ConnectionResetError:
                answer = None
            finally:
                writer.close()
            dropped.append(answer is None)
        return dropped

    first = await pattern(7)
    assert not any(first[0::2]), "queries are not in drop_ops"
    assert any(first[1::2]) and not all(first[1::2]), first
    assert await pattern(7) == first


async def test_drop_once_drops_the_first_request_of_each_named_op(proxy: FaultProxy) -> None:
    proxy.set_plan(FaultPlan(drop_once=frozenset({"read-key", "query-keys"})))
    outcomes = []
    for path in ["/acct/tKeys()", "/acct/tKeys()", "/acct/tKeys(PartitionKey='k',RowKey='key')"] * 2:
        reader, writer = await asyncio.open_connection(LOOPBACK, proxy.ports["table"])
        try:
            outcomes.append(
                await raw_request(reader, writer, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n") is not None
            )
        except ConnectionResetError:
            outcomes.append(False)
        finally:
            writer.close()
    assert outcomes == [False, True, False, True, True, True]
    assert sorted(proxy.fault_ops("drop")) == ["query-keys", "read-key"]


async def test_host_traffic_is_exempt_unless_included(proxy: FaultProxy) -> None:
    async def receive() -> bool:
        reader, writer = await asyncio.open_connection(LOOPBACK, proxy.ports["queue"])
        try:
            return (
                await raw_request(reader, writer, "GET /acct/chunks-x/messages HTTP/1.1\r\nHost: x\r\n\r\n")
                is not None
            )
        except ConnectionResetError:
            return False
        finally:
            writer.close()

    proxy.set_plan(FaultPlan(drop_probability=1.0))
    assert await receive()
    proxy.set_plan(FaultPlan(drop_probability=1.0, include_host=True))
    assert not await receive()
    assert [(f.kind, f.request.origin if f.request else None) for f in proxy.faults] == [("drop", "host")]


async def test_max_faults_bounds_the_faults(proxy: FaultProxy) -> None:
    proxy.set_plan(FaultPlan(drop_probability=1.0, max_faults=2))
    outcomes = []
    for _ in range(4):
        reader, writer = await asyncio.open_connection(LOOPBACK, proxy.ports["table"])
        try:
            outcomes.append(
                await raw_request(reader, writer, "GET /acct/tKeys() HTTP/1.1\r\nHost: x\r\n\r\n") is not None
            )
        except ConnectionResetError:
            outcomes.append(False)
        finally:
            writer.close()
    assert outcomes == [False, False, True, True]


# --- connection strings ----------------------------------------------------------------------------


def test_proxied_connection_string_rewrites_only_the_endpoints() -> None:
    original = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=abc==;"
        "QueueEndpoint=http://127.0.0.1:1001/devstoreaccount1;TableEndpoint=http://127.0.0.1:1002/devstoreaccount1;"
    )
    rewritten = proxied_connection_string(original, {"table": 2002, "queue": 2001})
    assert rewritten == original.replace(":1001/", ":2001/").replace(":1002/", ":2002/")
    assert endpoints_of(rewritten) == {
        "queue": ("127.0.0.1", 2001, "/devstoreaccount1"),
        "table": ("127.0.0.1", 2002, "/devstoreaccount1"),
    }


async def test_only_loopback_upstreams() -> None:
    remote = "TableEndpoint=http://10.0.0.1:1/a;QueueEndpoint=http://10.0.0.1:2/a"
    with pytest.raises(ValueError, match="loopback"):
        await start_faultproxy(remote)
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy({"table": 1}, upstream_host="192.0.2.1")


def test_plan_rules() -> None:
    with pytest.raises(ValueError):
        FaultPlan(drop_probability=1.5)
    with pytest.raises(ValueError):
        FaultPlan(idle_close_after=0.5, blackhole_after=0.5)


# --- classification --------------------------------------------------------------------------------


def message(
    start: str, body: dict[str, object] | None = None, headers: dict[str, str] | None = None
) -> Message:
    data = json.dumps(body).encode() if body is not None else b""
    return Message(start, list((headers or {}).items()), data, data)


def test_classifies_key_and_queue_operations() -> None:
    assert (
        classify("table", message("POST /a/xKeys HTTP/1.1", {"PartitionKey": "k-1", "RowKey": "key"})).op
        == "claim"
    )
    done = message("PUT /a/xKeys(PartitionKey='k-1',RowKey='key') HTTP/1.1", {"State": "Completed"})
    assert classify("table", done).op == "complete"
    taken = message("PUT /a/xKeys(PartitionKey='k-1',RowKey='key') HTTP/1.1", {"State": "InProgress"})
    assert classify("table", taken).op == "take-over"
    gone = message("DELETE /a/xKeys(PartitionKey='k-1',RowKey='key') HTTP/1.1", None, {"If-Match": "W/x"})
    assert classify("table", gone).op == "release"
    send = classify("queue", message("POST /a/chunks-x/messages?visibilitytimeout=3 HTTP/1.1"))
    assert (send.op, send.target, send.origin, send.write) == ("enqueue", "chunks-x", "app", True)
    receive = classify("queue", message("GET /a/chunks-x/messages?numofmessages=16 HTTP/1.1"))
    assert (receive.op, receive.origin) == ("receive", "host")
    delete = classify("queue", message("DELETE /a/chunks-x/messages/123?popreceipt=abc HTTP/1.1"))
    assert (delete.op, delete.origin) == ("delete-message", "host")
    assert classify("table", message("POST /a/Tables HTTP/1.1", {"TableName": "x"})).op == "create-table"


@pytest.fixture
async def through_proxy(azurite: Service) -> AsyncIterator[tuple[FaultProxy, Tables]]:
    """alertgate's tables under a prefix of their own, reached through a proxy in front of Azurite."""
    proxy = await start_faultproxy(azurite.urls["connection_string"])
    service = TableServiceClient.from_connection_string(proxy.connection_string)
    tables = Tables.from_service(service, f"f{uuid.uuid4().hex[:10]}")
    await tables.ensure_exist(service)
    try:
        yield proxy, tables
    finally:
        await tables.close()
        await service.close()
        await proxy.close()


async def test_classifies_alertgates_real_writes(through_proxy: tuple[FaultProxy, Tables]) -> None:
    """The wire format of shared/'s own writes, as the proxy names them (Azurite answers them)."""
    proxy, tables = through_proxy
    keys = IdempotencyStore(tables.keys, explicit_ttl=60, derived_ttl=0, claim_lease=5)
    ledger = Ledger(tables.operations)
    limiter = RateLimiter(tables.budget, [RateWindow(100, 1.0)], 0.0)
    proxy.clear()

    claim = await keys.claim(IdempotencyKey(KeyKind.EXPLICIT, "k"), "digest", str(uuid.uuid4()))
    assert claim.outcome is ClaimOutcome.CLAIMED
    plan = AcceptPlan(
        claim.record.operation_id, "http", {}, [(("a1", "a2"), {"status": "Resolved"})], "digest"
    )
    _, (chunk,) = await ledger.accept(plan)
    grant = await limiter.acquire(0.0)
    assert isinstance(grant, Grant)
    marked = await ledger.update_pending(chunk, state=PendingState.SENDING, attempts=1)
    assert marked is not None
    await ledger.finish(marked, ChunkResult.SUCCEEDED, 200, None)
    await limiter.release(grant)
    await limiter.block(1.0)
    await keys.complete(claim.record, StoredResponse(200, {}, "{}"))
    _, (other,) = await ledger.accept(
        AcceptPlan(str(uuid.uuid4()), "http", {}, [(("b1", "b2", "b3"), {})], "d2")
    )
    await ledger.split(other, 2)
    in_place = await ledger.pending_chunk(f"{other.chunk_id}-000")
    assert in_place is not None
    await ledger.finish(in_place, ChunkResult.SUCCEEDED, 200, None, in_place=True)
    async with QueueClient.from_connection_string(
        proxy.connection_string, f"q{uuid.uuid4().hex[:12]}"
    ) as queue:
        await queue.create_queue()
        await queue.send_message("{}")

    ops = [op for (_, op) in proxy.requests]
    writes = [
        op
        for op in ops
        if op
        in {
            "claim",
            "accept",
            "grant",
            "mark",
            "finish",
            "release-grant",
            "block",
            "complete",
            "split",
            "enqueue",
        }
    ]
    assert sorted(set(writes)) == sorted(
        {
            "claim",
            "accept",
            "grant",
            "mark",
            "finish",
            "release-grant",
            "block",
            "complete",
            "split",
            "enqueue",
        }
    ), proxy.requests
    assert proxy.requests[("table", "finish")] == 2, "the batch move and the write in place"
    assert (
        proxy.requests[("table", "create-counter")] == 1 and proxy.requests[("table", "create-budget")] == 1
    )
