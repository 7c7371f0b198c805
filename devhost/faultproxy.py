"""A fault-injecting TCP proxy between alertgate and Azurite's Table and Queue endpoints (loopback only).

In Azure, the path between a Functions instance and its storage account drops and closes connections in
ways Azurite on loopback never does. This proxy puts those ways back, one listener per service, so a test
can point the app's connection string at it (`proxied_connection_string`) and switch faults at run time
(`FaultProxy.set_plan`):

- **idle close** (`idle_close_after=T`): a client connection idle for T seconds is closed by the proxy
  (FIN, or RST with `idle_close_rst`), as Azure's load balancer does with idle flows.
- **silent drop** (`blackhole_after=T`): a client connection idle for T seconds is not closed but
  black-holed, as a NAT or firewall that forgot the flow: the next request on it is swallowed, never
  forwarded nor answered, and the connection stays open until the client gives up.
- **answer drop** (`drop_probability=p`, seeded): a request is forwarded to Azurite in full (so it is
  *applied*), its answer read and thrown away, and the client's connection reset (RST, SO_LINGER 0).

The proxy parses HTTP/1.1 enough to know where each request and response ends (Content-Length and
chunked bodies) and classifies every request (`RequestInfo`): service, method, table or queue name,
the partition and row keys it touches (from the URL, the JSON body, or each part of a `$batch` body), and
which of alertgate's storage operations it is (`op`: claim, accept, mark, grant, finish, ...; see
`classify`). Every fault is recorded with that classification (`FaultProxy.faults`), so a test can assert
how the faults were spread; `FaultProxy.requests` counts every request by service and op.

Traffic of the development host itself (its queue polling and settling: receive, delete and update of
messages, poison-queue sends) is `origin="host"` and exempt from faults unless `include_host=True`: that
is the Functions host's job, not alertgate's, and a storage rewrite in shared/ cannot change it.

Each request is forwarded on a fresh upstream connection (`Connection: close` to Azurite), so Azurite's
own keep-alive timeout never races the proxy; towards the client, connections are kept alive as
Azurite would keep them, which is what lets them go idle. It runs in the caller's event loop
(`start_faultproxy`, or `async with FaultProxy(...)`); every wait on Azurite is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import random
import re
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from devhost.services import LOOPBACK

SERVICES = ("table", "queue")
_ENDPOINT_SETTING = {"table": "TableEndpoint", "queue": "QueueEndpoint"}
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024**2
UPSTREAM_TIMEOUT_SECONDS = 30.0  # Azurite on loopback answers in milliseconds; this only bounds a wedge
JANITOR_SECONDS = 0.02  # how often idle connections are looked at (the idle close's resolution)

# alertgate's own operations, by what they write (see classify): the ones a storage seam must make safe.
WRITE_OPS = frozenset(
    {
        "claim",
        "take-over",
        "complete",
        "release",
        "accept",
        "mark",
        "update-pending",
        "finish",
        "split",
        "record-invalid",
        "create-counter",
        "grant",
        "release-grant",
        "block",
        "create-budget",
        "learn-batch-limit",
        "enqueue",
        "purge",
    }
)
_HOST_OPS = frozenset({"receive", "peek", "delete-message", "update-message", "clear-messages"})


# --- what a request is ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestInfo:
    """One request as the proxy understood it.

    `op` names alertgate's operation where the request is one (claim, accept, mark, grant, finish, ...),
    else a generic name (read-key, query-ledger, receive, create-table, other). `keys` are the
    (PartitionKey, RowKey) pairs it touches, every part of a `$batch` included.
    """

    service: str
    method: str
    path: str
    target: str = ""
    op: str = "other"
    origin: str = "app"
    keys: tuple[tuple[str, str], ...] = ()

    @property
    def write(self) -> bool:
        return self.op in WRITE_OPS

    def describe(self) -> str:
        keys = ",".join(f"{pk}/{rk}" for pk, rk in self.keys[:3])
        more = f"+{len(self.keys) - 3}" if len(self.keys) > 3 else ""
        where = f" {self.target}" if self.target else ""
        return f"{self.service} {self.method}{where} {self.op}" + (f" [{keys}{more}]" if keys else "")


@dataclass(frozen=True)
class FaultEvent:
    """One fault the proxy caused.

    kind: `idle-close` (an idle connection closed; `request` is the last request it carried),
    `blackhole` (a request swallowed on a black-holed connection), `drop` (a request applied at Azurite
    and its answer thrown away; `upstream_status` is what Azurite answered, so 2xx means it took effect).
    `at` is time.monotonic().
    """

    kind: str
    service: str
    connection: int
    at: float
    request: RequestInfo | None = None
    upstream_status: int | None = None

    def describe(self) -> str:
        what = self.request.describe() if self.request is not None else f"{self.service} (no request yet)"
        status = f" -> Azurite {self.upstream_status}" if self.upstream_status is not None else ""
        return f"{self.kind} conn={self.connection} {what}{status}"


@dataclass(frozen=True)
class FaultPlan:
    """Which faults are on. All off by default (the proxy then only forwards and counts).

    `drop_ops`, when set, limits the random answer drops to requests whose op is in it; `drop_once`
    drops the answer of the first request of each op it names (after the plan is set) whatever the
    dice say, so a run is sure to meet each; `services` limits every fault to those services;
    `max_faults` stops faulting after that many (counted over all kinds).
    """

    idle_close_after: float | None = None
    idle_close_rst: bool = False
    blackhole_after: float | None = None
    drop_probability: float = 0.0
    drop_ops: frozenset[str] | None = None
    drop_once: frozenset[str] = frozenset()
    seed: int = 0
    services: frozenset[str] = frozenset(SERVICES)
    include_host: bool = False
    max_faults: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_probability <= 1.0:
            raise ValueError("drop_probability must be within [0, 1]")
        for name in ("idle_close_after", "blackhole_after"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive seconds or None")
        if self.idle_close_after is not None and self.blackhole_after is not None:
            raise ValueError("an idle connection is either closed or black-holed, not both")
        unknown = set(self.services) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown services {sorted(unknown)}")


# --- HTTP/1.1 framing -----------------------------------------------------------------------------


class ProtocolError(Exception):
    """Bytes that are not HTTP/1.1 as the proxy understands it."""


@dataclass
class Message:
    """A request or response: its first line, headers in order, and the body exactly as framed."""

    start: str
    headers: list[tuple[str, str]]
    body: bytes = b""  # decoded (de-chunked) body, for classification
    raw_body: bytes = b""  # the body bytes as they travelled (chunked framing kept)

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    def has_token(self, name: str, token: str) -> bool:
        value = self.header(name) or ""
        return any(part.strip().lower() == token for part in value.split(","))

    def head_bytes(self, drop: Iterable[str] = (), add: Iterable[tuple[str, str]] = ()) -> bytes:
        dropped = {d.lower() for d in drop}
        lines = [self.start] + [f"{k}: {v}" for k, v in self.headers if k.lower() not in dropped]
        lines += [f"{k}: {v}" for k, v in add]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_head(reader: asyncio.StreamReader) -> Message | None:
    """The next message head, or None at a clean end of stream before any byte of it."""
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise ProtocolError("stream ended inside a message head") from exc
    except asyncio.LimitOverrunError as exc:
        raise ProtocolError("message head too large") from exc
    text = data.decode("latin-1")
    lines = text.split("\r\n")
    while lines and not lines[0]:  # tolerate stray CRLFs between messages (RFC 9112 §2.2)
        lines.pop(0)
    if not lines:
        return None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"bad header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return Message(lines[0], headers)


async def read_body(reader: asyncio.StreamReader, message: Message, *, until_eof: bool = False) -> None:
    """Read the message's body into it: chunked, Content-Length, to end of stream, or none."""
    if message.has_token("Transfer-Encoding", "chunked"):
        raw, decoded = bytearray(), bytearray()
        for _ in range(1_000_000):  # bounded: a chunk is at least one byte of size line
            line = await reader.readuntil(b"\r\n")
            raw += line
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError as exc:
                raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from exc
            if size == 0:
                for _ in range(1000):  # trailers, then the empty line
                    trailer = await reader.readuntil(b"\r\n")
                    raw += trailer
                    if trailer == b"\r\n":
                        break
                break
            if len(decoded) + size > MAX_BODY_BYTES:
                raise ProtocolError("chunked body too large")
            chunk = await reader.readexactly(size + 2)
            raw += chunk
            decoded += chunk[:-2]
        message.raw_body, message.body = bytes(raw), bytes(decoded)
        return
    length = message.header("Content-Length")
    if length is not None:
        try:
            n = int(length)
        except ValueError as exc:
            raise ProtocolError(f"bad Content-Length {length!r}") from exc
        if not 0 <= n <= MAX_BODY_BYTES:
            raise ProtocolError(f"Content-Length {n} out of range")
        message.body = message.raw_body = await reader.readexactly(n)
        return
    if until_eof:
        data = await reader.read(MAX_BODY_BYTES + 1)
        rest = bytearray(data)
        for _ in range(100_000):
            if not data:
                break
            data = await reader.read(65536)
            rest += data
        message.body = message.raw_body = bytes(rest)


def _status_of(response: Message) -> int:
    parts = response.start.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ProtocolError(f"bad status line {response.start[:80]!r}")
    return int(parts[1])


def _has_no_body(method: str, status: int) -> bool:
    return method == "HEAD" or status in (204, 304) or 100 <= status < 200


def _framed(request: Message, response: Message) -> bool:
    """Whether the response's end is known without closing the connection (else the client must be
    told `Connection: close`: its body ended with Azurite's close)."""
    if _has_no_body(request.start.split(" ", 1)[0].upper(), _status_of(response)):
        return True
    return response.header("Content-Length") is not None or response.has_token("Transfer-Encoding", "chunked")


# --- classification -------------------------------------------------------------------------------

_ENTITY_PATH = re.compile(r"^/(?P<account>[^/]+)/(?P<table>[^/(]+)(?:\((?P<keys>.*)\))?$")
_KEYS = re.compile(r"PartitionKey='(?P<pk>(?:[^']|'')*)',\s*RowKey='(?P<rk>(?:[^']|'')*)'")
_BATCH_LINE = re.compile(r"^(GET|POST|PUT|MERGE|PATCH|DELETE) (\S+) HTTP/1\.[01]$")
_FINISHED_STATES = frozenset({"Succeeded", "Failed", "OutcomeUnknown"})


@dataclass(frozen=True)
class _Part:
    """One entity operation: a plain request, or one part of a $batch."""

    method: str
    table: str
    keys: tuple[str, str] | None  # from the URL
    query: bool  # `table()` with a $filter, or the table itself without keys on a GET
    body: dict[str, Any] | None
    if_match: bool


def _entity_keys(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    found = _KEYS.search(text)
    if found is None:
        return None
    return found["pk"].replace("''", "'"), found["rk"].replace("''", "'")


def _json_object(data: bytes) -> dict[str, Any] | None:
    if not data.strip():
        return None
    try:
        document = json.loads(data)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _table_part(method: str, url_path: str, body: bytes, if_match: bool) -> _Part | None:
    path = unquote(urlsplit(url_path).path)
    matched = _ENTITY_PATH.match(path)
    if matched is None:
        return None
    keys = _entity_keys(matched["keys"])
    query = method == "GET" and keys is None
    return _Part(method, matched["table"], keys, query, _json_object(body), if_match)


def _batch_parts(body: bytes) -> list[_Part]:
    """The operations of a `$batch` (multipart/mixed with one changeset), in order."""
    text = body.decode("utf-8", errors="replace").replace("\r\n", "\n")
    lines = text.split("\n")
    parts: list[_Part] = []
    i = 0
    while i < len(lines):
        found = _BATCH_LINE.match(lines[i].strip())
        if found is None:
            i += 1
            continue
        method, url = found[1], found[2]
        i += 1
        if_match = False
        while i < len(lines) and lines[i].strip():
            if lines[i].lower().startswith("if-match:"):
                if_match = True
            i += 1
        collected: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].startswith("--"):
            collected.append(lines[i])
            i += 1
        part = _table_part(method, url, "\n".join(collected).encode(), if_match)
        if part is not None:
            parts.append(part)
    return parts


def _part_keys(part: _Part) -> tuple[str, str] | None:
    if part.keys is not None:
        return part.keys
    if part.body is not None and "PartitionKey" in part.body and "RowKey" in part.body:
        return str(part.body["PartitionKey"]), str(part.body["RowKey"])
    return None


def _role(table: str) -> str:
    """alertgate's tables are `<prefix>Keys`, `<prefix>Operations`, `<prefix>Budget` (shared.tables)."""
    for suffix in ("Keys", "Operations", "Budget"):
        if table.endswith(suffix):
            return suffix.lower()
    return ""


class _BudgetMemory:
    """The last grant log the proxy saw for each budget entity, to tell a grant from a release or block."""

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str, str], int] = {}  # (table, pk, rk) -> the log's last entry (ms)

    @staticmethod
    def last_entry(document: Mapping[str, Any] | None) -> int | None:
        if document is None or "Log" not in document:
            return None
        entries = [int(p) for p in str(document.get("Log") or "").split(",") if p.strip().isdigit()]
        return max(entries) if entries else 0

    def remember(self, key: tuple[str, str, str], document: Mapping[str, Any] | None) -> None:
        last = self.last_entry(document)
        if last is not None:
            self.latest[key] = last


def _op_of_part(part: _Part, budget: _BudgetMemory) -> str:
    role, keys, body, method = _role(part.table), _part_keys(part), part.body, part.method
    rk = keys[1] if keys else ""
    if role == "keys":
        if method == "POST":
            return "claim"
        if method in ("PUT", "MERGE", "PATCH"):
            return "complete" if (body or {}).get("State") == "Completed" else "take-over"
        if method == "DELETE":
            return "release" if part.if_match else "purge"
        return "query-keys" if part.query else "read-key"
    if role == "operations":
        if method == "POST":
            return (
                "create-counter" if rk == "counter" else "record-invalid" if rk.startswith("o-") else "insert"
            )
        if method in ("PUT", "MERGE", "PATCH"):
            if rk.startswith("p-"):
                state = (body or {}).get("State")
                if state == "Sending":
                    return "mark"
                return "finish" if state in _FINISHED_STATES else "update-pending"
            return "finish" if rk.startswith("r-") else "write-ledger"
        if method == "DELETE":
            return "delete-pending" if rk.startswith("p-") else "purge"
        if part.query:
            return "query-ledger"
        prefix = rk.split("-", 1)[0] if "-" in rk else rk
        return {
            "counter": "read-counter",
            "o": "read-operation",
            "p": "read-pending",
            "r": "read-result",
        }.get(prefix, "read-ledger")
    if role == "budget":
        if rk == "batch-limit":
            return "read-batch-limit" if method == "GET" else "learn-batch-limit"
        if method == "POST":
            return "create-budget"
        if method in ("PUT", "MERGE", "PATCH") and keys is not None:
            before = budget.latest.get((part.table, keys[0], keys[1]))
            after = budget.last_entry(body)
            if after is not None and (before is None or after > before):
                return "grant"
            if before is not None and after is not None and after < before:
                return "release-grant"
            return "block"
        return "read-budget"
    return "other"


def _batch_op(parts: list[_Part]) -> str:
    rows = [(_part_keys(p) or ("", ""))[1] for p in parts]
    methods = [p.method for p in parts]
    if "counter" in rows:
        return "accept"
    deletes = [r for r, m in zip(rows, methods, strict=True) if m == "DELETE" and r.startswith("p-")]
    if deletes and any(r.startswith("r-") for r in rows):
        return "finish"
    if deletes and any(r.startswith("p-") and m == "POST" for r, m in zip(rows, methods, strict=True)):
        return "split"
    return "batch"


def classify(service: str, request: Message, budget: _BudgetMemory | None = None) -> RequestInfo:
    """What a request is, from its method, URL, headers and body (see RequestInfo).

    alertgate's writes (row keys from shared.ledger, shared.idempotency, shared.ratelimit):

    - Keys table: insert = `claim`; replace with State Completed = `complete`, with InProgress =
      `take-over` (a stale claim renewed or an expired key replaced); conditional delete = `release`.
    - Operations table (partition `ledger`): the `$batch` that moves `counter` = `accept`; a `$batch`
      deleting `p-<seq>` and writing `r-<seq>` = `finish` (the worker's finish, or the sweep settling a
      chunk finished in place); a replace of `p-<seq>` with State Sending = `mark`, with a finished
      State = `finish` (in place, on the synchronous path), with Pending = `update-pending` (unmark,
      back-off, schedule); a `$batch` deleting `p-<seq>` and inserting `p-<seq>-<n>` = `split`.
    - Budget table: a replace of `mde/calls` whose log gained a later entry = `grant` (also a
      reservation), lost its last entry = `release-grant`, else `block` (a 429's BlockedUntil);
      `mde/batch-limit` writes = `learn-batch-limit`.
    - Queues: a message sent = `enqueue` (alertgate's; `origin="host"` for a poison queue); receive,
      peek, delete and update of messages are the host's.
    """
    method = request.start.split(" ", 1)[0].upper()
    target_url = request.start.split(" ")[1] if " " in request.start else "/"
    split = urlsplit(target_url)
    path = unquote(split.path)
    query = {k.lower(): v for k, v in parse_qsl(split.query, keep_blank_values=True)}
    segments = [s for s in path.split("/") if s]
    if service == "queue":
        return _classify_queue(method, path, segments, query)
    budget = budget or _BudgetMemory()
    if len(segments) == 2 and segments[1] == "$batch":
        parts = _batch_parts(request.body)
        keys = tuple(k for k in (_part_keys(p) for p in parts) if k is not None)
        table = parts[0].table if parts else ""
        return RequestInfo(service, method, path, table, _batch_op(parts), "app", keys)
    if len(segments) == 2 and segments[1].split("(", 1)[0] == "Tables":
        op = "create-table" if method == "POST" else "delete-table" if method == "DELETE" else "list-tables"
        return RequestInfo(service, method, path, "", op, "app")
    part = _table_part(method, target_url, request.body, request.header("If-Match") is not None)
    if part is None:
        return RequestInfo(service, method, path, "", "other", "app")
    one = _part_keys(part)
    return RequestInfo(
        service, method, path, part.table, _op_of_part(part, budget), "app", (one,) if one else ()
    )


def _classify_queue(method: str, path: str, segments: list[str], query: dict[str, str]) -> RequestInfo:
    queue = segments[1] if len(segments) >= 2 else ""
    if len(segments) <= 1:
        return RequestInfo("queue", method, path, "", "list-queues" if method == "GET" else "other", "app")
    if len(segments) == 2:
        if method == "PUT" and "comp" not in query:
            op = "create-queue"
        elif method == "GET" and query.get("comp") == "metadata":
            op = "queue-properties"
        elif method == "DELETE":
            op = "delete-queue"
        else:
            op = "queue-other"
        return RequestInfo("queue", method, path, queue, op, "app")
    if len(segments) == 3 and segments[2] == "messages":
        if method == "POST":
            origin = "host" if queue.endswith("-poison") else "app"
            return RequestInfo("queue", method, path, queue, "enqueue", origin)
        if method == "GET":
            op = "peek" if query.get("peekonly", "").lower() == "true" else "receive"
            return RequestInfo("queue", method, path, queue, op, "host")
        if method == "DELETE":
            return RequestInfo("queue", method, path, queue, "clear-messages", "host")
    if len(segments) == 4 and segments[2] == "messages":
        op = (
            "delete-message" if method == "DELETE" else "update-message" if method == "PUT" else "queue-other"
        )
        return RequestInfo("queue", method, path, queue, op, "host" if op in _HOST_OPS else "app")
    return RequestInfo("queue", method, path, queue, "queue-other", "app")


# --- the proxy ------------------------------------------------------------------------------------


@dataclass
class _Connection:
    id: int
    service: str
    writer: asyncio.StreamWriter
    last_active: float
    busy: bool = False
    closed: bool = False
    last_request: RequestInfo | None = None
    requests: int = 0


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN (SO_LINGER on, zero seconds), as a dropped flow shows to a client."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class FaultProxy:
    """One listener per service on loopback, forwarding to Azurite's ports (`upstream`), with faults.

    Use `async with FaultProxy({"table": p1, "queue": p2}) as proxy` or `await start_faultproxy(...)`;
    `proxy.ports` are the listening ports, `proxy.set_plan(FaultPlan(...))` switches faults (and
    re-seeds the drop RNG), `proxy.faults` lists what it did, `proxy.requests` counts requests by
    (service, op), `proxy.clear()` forgets both.
    """

    upstream: Mapping[str, int]
    plan: FaultPlan = field(default_factory=FaultPlan)
    upstream_host: str = LOOPBACK
    ports: dict[str, int] = field(default_factory=dict)
    faults: list[FaultEvent] = field(default_factory=list)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)  # client connections, by service
    source_connection_string: str = ""

    def __post_init__(self) -> None:
        if self.upstream_host not in (LOOPBACK, "localhost", "::1"):
            raise ValueError(f"the fault proxy forwards to loopback only, not {self.upstream_host!r}")
        unknown = set(self.upstream) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown services {sorted(unknown)}")
        self._servers: list[asyncio.Server] = []
        self._connections: dict[int, _Connection] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)
        self._rng = random.Random(self.plan.seed)
        self._dropped_once: set[str] = set()
        self._budget = _BudgetMemory()
        self._janitor: asyncio.Task[None] | None = None

    # -- control ----------------------------------------------------------------------------------

    def set_plan(self, plan: FaultPlan) -> None:
        """Switch faults now; the drop RNG restarts from the plan's seed."""
        self.plan = plan
        self._rng = random.Random(plan.seed)
        self._dropped_once = set()

    def clear(self) -> None:
        self.faults.clear()
        self.requests.clear()
        self.accepted.clear()

    def faults_of(self, kind: str) -> list[FaultEvent]:
        return [f for f in self.faults if f.kind == kind]

    def fault_ops(self, kind: str | None = None) -> Counter[str]:
        """How the faults (of one kind, or all) were spread over ops."""
        return Counter(
            f.request.op if f.request is not None else "(none)"
            for f in self.faults
            if kind is None or f.kind == kind
        )

    @property
    def open_connections(self) -> int:
        return sum(1 for c in self._connections.values() if not c.closed)

    @property
    def connection_string(self) -> str:
        """The connection string the proxy was started from, with both endpoints through the proxy."""
        if not self.source_connection_string:
            raise ValueError("started from ports, not a connection string: use proxied_connection_string")
        return proxied_connection_string(self.source_connection_string, self.ports)

    # -- life cycle -------------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        for service in self.upstream:
            server = await asyncio.start_server(
                functools.partial(self._serve, service), LOOPBACK, 0, limit=MAX_HEAD_BYTES
            )
            self._servers.append(server)
            self.ports[service] = int(server.sockets[0].getsockname()[1])
        self._janitor = asyncio.create_task(self._watch_idle())
        return self

    async def close(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        for server in self._servers:
            server.close()
        for conn in list(self._connections.values()):
            conn.closed = True
            conn.writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=5.0)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- faults -----------------------------------------------------------------------------------

    def _applies(self, service: str, info: RequestInfo | None) -> bool:
        plan = self.plan
        if service not in plan.services:
            return False
        if plan.max_faults is not None and len(self.faults) >= plan.max_faults:
            return False
        return not (info is not None and info.origin == "host" and not plan.include_host)

    def _record(
        self, kind: str, conn: _Connection, info: RequestInfo | None, status: int | None = None
    ) -> None:
        self.faults.append(FaultEvent(kind, conn.service, conn.id, time.monotonic(), info, status))

    async def _watch_idle(self) -> None:
        """Close connections idle for `idle_close_after` (the load balancer's idle timeout)."""
        while True:
            await asyncio.sleep(JANITOR_SECONDS)
            after = self.plan.idle_close_after
            if after is None:
                continue
            now = time.monotonic()
            for conn in list(self._connections.values()):
                if conn.closed or conn.busy or now - conn.last_active < after:
                    continue
                if conn.requests == 0 or not self._applies(conn.service, conn.last_request):
                    continue  # a connection that never carried a request has no flow yet
                conn.closed = True
                self._record("idle-close", conn, conn.last_request)
                if self.plan.idle_close_rst:
                    _reset(conn.writer)
                else:
                    conn.writer.close()

    # -- serving ----------------------------------------------------------------------------------

    async def _serve(self, service: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Connection(next(self._ids), service, writer, time.monotonic())
        self.accepted[service] += 1
        self._connections[conn.id] = conn
        try:
            await self._serve_requests(conn, reader)
        except (ProtocolError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, TimeoutError):
            pass  # the connection ends; the client sees it closed, as it would any broken connection
        except asyncio.CancelledError:
            pass  # the proxy is closing: end quietly (asyncio would log a cancelled handler as an error)
        finally:
            conn.closed = True
            self._connections.pop(conn.id, None)
            self._tasks.discard(task)
            writer.close()

    async def _serve_requests(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        for _ in range(1_000_000):  # one connection's requests, bounded
            request = await read_head(reader)
            if request is None or conn.closed:
                return
            idle = time.monotonic() - conn.last_active
            conn.busy = True
            if request.has_token("Expect", "100-continue"):
                conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.headers = [(k, v) for k, v in request.headers if k.lower() != "expect"]
            await read_body(reader, request)
            info = classify(conn.service, request, self._budget)
            self.requests[(conn.service, info.op)] += 1
            conn.requests += 1
            conn.last_request = info
            blackhole = self.plan.blackhole_after
            if (
                blackhole is not None
                and conn.requests > 1
                and idle >= blackhole
                and self._applies(conn.service, info)
            ):
                self._record("blackhole", conn, info)
                await self._swallow(reader)
                return
            dropping = self._applies(conn.service, info) and self._draw_drop(info)
            response = await self._forward(conn.service, request, info)
            if dropping:
                self._record("drop", conn, info, _status_of(response))
                conn.closed = True
                _reset(conn.writer)
                return
            close = request.has_token("Connection", "close") or not _framed(request, response)
            keep = [("Connection", "close")] if close else []
            conn.writer.write(response.head_bytes(drop=("Connection", "Keep-Alive"), add=keep))
            conn.writer.write(response.raw_body)
            await conn.writer.drain()
            conn.busy = False
            conn.last_active = time.monotonic()
            if close:
                return

    def _draw_drop(self, info: RequestInfo) -> bool:
        plan = self.plan
        if info.op in plan.drop_once and info.op not in self._dropped_once:
            self._dropped_once.add(info.op)
            return True
        if plan.drop_probability <= 0 or (plan.drop_ops is not None and info.op not in plan.drop_ops):
            return False
        return self._rng.random() < plan.drop_probability

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        """A black-holed flow: read and discard whatever comes, answer nothing, until the client closes."""
        for _ in range(1_000_000):
            data = await reader.read(65536)
            if not data:
                return

    async def _forward(self, service: str, request: Message, info: RequestInfo) -> Message:
        """Send the request to Azurite on a fresh connection and read its whole answer (bounded)."""
        method = request.start.split(" ", 1)[0].upper()
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(self.upstream_host, self.upstream[service], limit=MAX_HEAD_BYTES),
            UPSTREAM_TIMEOUT_SECONDS,
        )
        try:
            up_writer.write(
                request.head_bytes(drop=("Connection", "Keep-Alive"), add=[("Connection", "close")])
            )
            up_writer.write(request.raw_body)
            await up_writer.drain()

            async def answer() -> Message:
                for _ in range(10):  # interim 1xx answers are skipped (the client was told 100 already)
                    response = await read_head(up_reader)
                    if response is None:
                        raise ProtocolError("Azurite closed without answering")
                    status = _status_of(response)
                    if not 100 <= status < 200:
                        await read_body(up_reader, response, until_eof=not _has_no_body(method, status))
                        return response
                raise ProtocolError("too many interim answers")

            response = await asyncio.wait_for(answer(), UPSTREAM_TIMEOUT_SECONDS)
        finally:
            up_writer.close()
        self._learn(info, request, response)
        return response

    def _learn(self, info: RequestInfo, request: Message, response: Message) -> None:
        """Keep the budget log's last entry as Azurite now has it (to classify the next budget write)."""
        if info.service != "table" or _role(info.target) != "budget" or not info.keys:
            return
        status = _status_of(response)
        key = (info.target, *info.keys[0])
        if info.method == "GET" and status == 200:
            self._budget.remember(key, _json_object(response.body))
        elif info.method in ("PUT", "POST", "MERGE", "PATCH") and 200 <= status < 300:
            self._budget.remember(key, _json_object(request.body))


# --- helpers for tests and tools ------------------------------------------------------------------


def endpoints_of(connection_string: str) -> dict[str, tuple[str, int, str]]:
    """service -> (host, port, path) of the TableEndpoint and QueueEndpoint in a connection string."""
    found: dict[str, tuple[str, int, str]] = {}
    for part in connection_string.split(";"):
        name, _, value = part.partition("=")
        for service, setting in _ENDPOINT_SETTING.items():
            if name.strip().lower() == setting.lower():
                url = urlsplit(value.strip())
                if url.hostname is None or url.port is None:
                    raise ValueError(f"{setting} has no host and port: {value!r}")
                found[service] = (url.hostname, url.port, url.path)
    return found


def proxied_connection_string(connection_string: str, ports: Mapping[str, int]) -> str:
    """The connection string with TableEndpoint and QueueEndpoint pointing at the proxy's ports (the
    account path, key and everything else kept)."""
    parts = []
    for part in connection_string.split(";"):
        name, sep, value = part.partition("=")
        for service, setting in _ENDPOINT_SETTING.items():
            if sep and name.strip().lower() == setting.lower() and service in ports:
                url = urlsplit(value.strip())
                value = url._replace(netloc=f"{LOOPBACK}:{ports[service]}").geturl()
        parts.append(f"{name}{sep}{value}" if sep else part)
    return ";".join(parts)


async def start_faultproxy(connection_string: str, plan: FaultPlan | None = None) -> FaultProxy:
    """A started FaultProxy in this event loop in front of the endpoints of an Azurite connection string
    (which must be on loopback); `proxy.connection_string` is the string to give the app. Close it with
    `await proxy.close()` (or use `async with FaultProxy(...)`)."""
    endpoints = endpoints_of(connection_string)
    missing = [s for s in SERVICES if s not in endpoints]
    if missing:
        raise ValueError(f"the connection string names no {', '.join(missing)} endpoint")
    hosts = {host for host, _, _ in endpoints.values()}
    if not hosts <= {LOOPBACK, "localhost"}:
        raise ValueError(f"the fault proxy forwards to loopback only, not {sorted(hosts)}")
    proxy = FaultProxy(
        {s: port for s, (_, port, _) in endpoints.items()},
        plan or FaultPlan(),
        source_connection_string=connection_string,
    )
    return await proxy.start()


__all__ = [
    "WRITE_OPS",
    "FaultEvent",
    "FaultPlan",
    "FaultProxy",
    "RequestInfo",
    "classify",
    "endpoints_of",
    "proxied_connection_string",
    "start_faultproxy",
]
