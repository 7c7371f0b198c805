"""In-memory stand-ins for Azure Table Storage, so state code can be unit-tested without Azurite.

- `MemoryTable` implements the `StateStore` protocol (shared.storage) with the semantics `StateTable`
  gives over Table Storage once its retries have settled a call: a value, None for a failed condition,
  `StorageUnavailable` (only when a fault is injected with `fail_next`). Ledger, idempotency store,
  budget and batch limit run over it unchanged.
- `FakeTableClient` is the part of azure's async `TableClient` that `StateTable` calls, raising the SDK's
  own exceptions, with scripted faults (not sent, answer lost, 503, a write that lands late). It is what
  lets the seam's retry and read-back logic be tested branch by branch.

Both keep their rows in a `TableState`, which applies Table Storage's rules: ETags that change on every
write, conditional update and delete (`If-Match`), atomic entity-group transactions in one partition,
the SDK's conversion of property values (None dropped, Int32 range, Int64 as `EntityProperty`), the
service's limits that code could plausibly hit (key characters, 64 KiB property values, 100 operations
and one write per row in a transaction), and OData `$filter` over `@parameters` as the SDK substitutes
them. The aim is that code which passes here does not fail on Azure for a reason these fakes could
have shown.

Calls are atomic and never yield to the event loop: interleavings are scripted (`FakeTableClient.inject`
with a hook, or a wrapper such as tests.unit.upstream_fakes.TappedStore), so tests stay deterministic.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import operator
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import EdmType, EntityProperty, TableEntity, TableTransactionError, UpdateMode

from shared.errors import StorageUnavailable
from shared.storage import Entity, Operation

T = TypeVar("T")
E = TypeVar("E", bound=HttpResponseError)

MAX_TRANSACTION_OPERATIONS = 100
MAX_KEY_CHARS = 1024
MAX_VALUE_BYTES = 64 * 1024  # a String (UTF-16) or Binary property value
_INT32 = 2**31
_INT64 = 2**63
_FORBIDDEN_KEY_CHARS = re.compile(r"[/\\#?\x00-\x1f\x7f-\x9f]")

# One counter for every table, so an ETag never repeats across tables or rows (as on Azure, where the
# ETag carries the write's timestamp).
_etag_numbers = itertools.count(1)


def _new_etag() -> str:
    return f"W/\"datetime'2024-01-01T00%3A00%3A00.{next(_etag_numbers):09d}Z'\""


# --- failures, as the service answers them ----------------------------------------------------------------


class TableFailure(Exception):
    """What the service answered instead of applying a write: a status, an error code, and the index of
    the operation in a transaction. Each front turns it into what its caller expects (MemoryTable: None,
    True/False or an exception; FakeTableClient: the SDK's exception)."""

    def __init__(self, status: int, code: str, message: str, index: int = 0) -> None:
        self.status = status
        self.code = code
        self.index = index
        super().__init__(message)


def _exists() -> TableFailure:
    return TableFailure(409, "EntityAlreadyExists", "The specified entity already exists.")


def _not_found() -> TableFailure:
    return TableFailure(404, "ResourceNotFound", "The specified resource does not exist.")


def _modified() -> TableFailure:
    return TableFailure(
        412, "UpdateConditionNotSatisfied", "The update condition specified in the request was not satisfied."
    )


def _invalid(code: str, message: str) -> TableFailure:
    return TableFailure(400, code, message)


def http_error(cls: type[E], status: int, code: str, message: str) -> E:
    """An SDK exception as `_decode_error` builds it from a response: the message ends with the error code,
    and `status_code`/`error_code` are set (is_conflict and is_transient read both)."""
    error = cls(message=f"{message}\nErrorCode:{code}")
    error.status_code = status
    error.reason = {
        404: "Not Found",
        409: "Conflict",
        412: "Precondition Failed",
        503: "Service Unavailable",
    }.get(status, "Error")
    error.error_code = code  # type: ignore[attr-defined]  # the SDK sets it the same way
    return error


def _sdk_error(failure: TableFailure) -> HttpResponseError:
    """The exception the SDK raises for a single-entity call that the service refused."""
    cls: type[HttpResponseError] = {
        404: ResourceNotFoundError,
        409: ResourceExistsError,
        412: ResourceModifiedError,
    }.get(failure.status, HttpResponseError)
    return http_error(cls, failure.status, failure.code, str(failure))


def _transaction_error(failure: TableFailure) -> TableTransactionError:
    """The exception the SDK raises when one operation of a transaction failed (prefixed with its index)."""
    return http_error(TableTransactionError, failure.status, failure.code, f"{failure.index}:{failure}")


# --- values, as the SDK converts them --------------------------------------------------------------------


def _stored_value(name: str, value: Any) -> Any:
    """A property value as it comes back from the service after the SDK sent it (shared code reads what
    Azure returns, not what it wrote): StrEnums as plain strings, Edm.Int64 as an EntityProperty, ints
    out of Int32 range refused by the SDK (TypeError) unless typed Int64, over-long values refused by
    the service (400)."""
    if isinstance(value, enum.Enum):
        value = str(value)
    elif isinstance(value, tuple):  # EntityProperty, or a (value, EdmType) pair
        raw, edm = value[0], EdmType(value[1])
        if edm is EdmType.INT64:
            number = int(raw)
            if not -_INT64 <= number < _INT64:
                raise TypeError(f"{name}: {raw} is too large to be cast to type Edm.Int64")
            return EntityProperty(number, EdmType.INT64)
        if edm is EdmType.INT32:
            value = int(raw)
        elif edm is EdmType.DOUBLE:
            value = float(raw)
        elif edm is EdmType.STRING:
            value = str(raw)
        else:
            value = raw
    elif type(value) not in (str, int, bool, float, bytes, datetime, uuid.UUID):
        raise TypeError(f"{name}: type {type(value)} is not supported by the Table service SDK")
    if type(value) is int and not -_INT32 <= value < _INT32:
        raise TypeError(f"{name}: {value} is too large to be cast to type Edm.Int32 (use Edm.Int64)")
    if isinstance(value, str) and len(value.encode("utf-16-le")) > MAX_VALUE_BYTES:
        raise _invalid(
            "PropertyValueTooLarge", f"The property value of {name} exceeds the maximum size (64 KiB)."
        )
    if isinstance(value, bytes) and len(value) > MAX_VALUE_BYTES:
        raise _invalid(
            "PropertyValueTooLarge", f"The property value of {name} exceeds the maximum size (64 KiB)."
        )
    return value


def _check_key(name: str, key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"{name} must be a string, not {type(key).__name__}")
    if len(key) > MAX_KEY_CHARS or _FORBIDDEN_KEY_CHARS.search(key):
        raise _invalid(
            "OutOfRangeInput", f"{name} {key!r} is too long or contains a character Table Storage forbids."
        )
    return key


def _properties(entity: Mapping[str, Any]) -> dict[str, Any]:
    """The properties as stored: keys checked, None values dropped (the SDK does not send them)."""
    if "PartitionKey" not in entity or "RowKey" not in entity:
        raise ValueError("PartitionKey and/or RowKey were not provided in entity")
    props = {name: _stored_value(name, value) for name, value in entity.items() if value is not None}
    _check_key("PartitionKey", props["PartitionKey"])
    _check_key("RowKey", props["RowKey"])
    return props


def _if_match(etag: str | None, match_condition: Any) -> str:
    """The If-Match header the SDK sends for (etag, match_condition), refusing what the SDK refuses:
    IfNotModified needs an ETag ("*" matches any existing row); without a condition an ETag is an error."""
    condition = match_condition or MatchConditions.Unconditionally
    if condition == MatchConditions.IfNotModified:
        if not etag:
            raise ValueError("IfNotModified must be specified with etag.")
        return etag
    if condition == MatchConditions.Unconditionally:
        if etag:
            raise ValueError("Etag is not supported for an Unconditional operation.")
        return "*"
    raise ValueError(f"Unsupported match condition: {condition}")


def _mode(mode: Any) -> UpdateMode:
    if mode in (UpdateMode.REPLACE, UpdateMode.MERGE):
        return UpdateMode(mode)
    raise ValueError(f"Mode type '{mode}' is not supported.")


# --- the rows -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    properties: dict[str, Any]
    etag: str
    timestamp: datetime

    def entity(self, select: Sequence[str] | None = None) -> TableEntity:
        """A fresh TableEntity (callers may change it freely), with its ETag in `.metadata` like the SDK's."""
        if select is None:
            props = dict(self.properties)
        else:
            props = {name: self.properties[name] for name in select if name in self.properties}
        entity = TableEntity(props)
        entity._metadata = {"etag": self.etag, "timestamp": self.timestamp}
        return entity


Key = tuple[str, str]


class TableState:
    """One table's rows, and the rules Table Storage applies when they are written and queried."""

    def __init__(self) -> None:
        self.rows: dict[Key, Row] = {}

    # -- reading -----------------------------------------------------------------------------------------

    def read(self, partition_key: str, row_key: str) -> TableEntity | None:
        row = self.rows.get((partition_key, row_key))
        return None if row is None else row.entity()

    def query(
        self, query_filter: str, parameters: Mapping[str, Any] | None, select: Sequence[str] | None
    ) -> list[TableEntity]:
        """Entities matching the filter, ordered by PartitionKey then RowKey as the service returns them."""
        matches = compile_filter(query_filter, parameters or {})
        return [
            self.rows[key].entity(select) for key in sorted(self.rows) if matches(self.rows[key].properties)
        ]

    def all(self) -> list[TableEntity]:
        return [self.rows[key].entity() for key in sorted(self.rows)]

    # -- writing (each raises TableFailure instead of applying) ---------------------------------------------

    def put(self, entity: Entity) -> str:
        """Write the row whatever is there (a test arranging state, or another writer): its new ETag."""
        return self._write(dict(self.rows), _properties(entity), commit=True)

    def create(self, entity: Entity) -> str:
        rows = dict(self.rows)
        etag = self._create(rows, _properties(entity))
        self.rows = rows
        return etag

    def update(self, entity: Entity, mode: Any, etag: str | None, match_condition: Any) -> str:
        rows = dict(self.rows)
        new_etag = self._update(rows, _properties(entity), _mode(mode), _if_match(etag, match_condition))
        self.rows = rows
        return new_etag

    def delete(self, partition_key: str, row_key: str, etag: str | None, match_condition: Any) -> None:
        rows = dict(self.rows)
        self._delete(rows, (partition_key, row_key), _if_match(etag, match_condition))
        self.rows = rows

    def transaction(self, operations: Sequence[Operation]) -> list[dict[str, Any]]:
        """Apply every operation or none; per operation the SDK's result metadata ({"etag": ...}, or {} for
        a delete). A refused operation raises TableFailure carrying its index."""
        parsed = [_parse_operation(op) for op in operations]
        if not parsed:
            return []
        partitions = {props["PartitionKey"] for _, props, _ in parsed}
        if len(partitions) > 1:
            raise ValueError("Partition Keys in the batch must all be the same.")
        if len(parsed) > MAX_TRANSACTION_OPERATIONS:
            raise _invalid(
                "InvalidInput", f"A transaction holds at most {MAX_TRANSACTION_OPERATIONS} operations."
            )
        keys = [(props["PartitionKey"], props["RowKey"]) for _, props, _ in parsed]
        if len(set(keys)) != len(keys):
            raise _invalid(
                "InvalidDuplicateRow", "The batch request contains multiple changes to one entity."
            )
        rows = dict(self.rows)
        results: list[dict[str, Any]] = []
        for index, (kind, props, kwargs) in enumerate(parsed):
            try:
                results.append(self._apply(rows, kind, props, kwargs))
            except TableFailure as failure:
                failure.index = index
                raise
        self.rows = rows
        return results

    def _apply(
        self, rows: dict[Key, Row], kind: str, props: dict[str, Any], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if kind == "create":
            return {"etag": self._create(rows, props)}
        if kind == "update":
            if_match = _if_match(kwargs.get("etag"), kwargs.get("match_condition"))
            return {"etag": self._update(rows, props, _mode(kwargs.get("mode", UpdateMode.MERGE)), if_match)}
        if kind == "upsert":
            mode = _mode(kwargs.get("mode", UpdateMode.MERGE))
            current = rows.get((props["PartitionKey"], props["RowKey"]))
            merged = {**current.properties, **props} if current and mode is UpdateMode.MERGE else props
            return {"etag": self._write(rows, merged)}
        self._delete(
            rows,
            (props["PartitionKey"], props["RowKey"]),
            _if_match(kwargs.get("etag"), kwargs.get("match_condition")),
        )
        return {}

    def _create(self, rows: dict[Key, Row], props: dict[str, Any]) -> str:
        if (props["PartitionKey"], props["RowKey"]) in rows:
            raise _exists()
        return self._write(rows, props)

    def _update(self, rows: dict[Key, Row], props: dict[str, Any], mode: UpdateMode, if_match: str) -> str:
        current = self._matching(rows, (props["PartitionKey"], props["RowKey"]), if_match)
        return self._write(rows, {**current.properties, **props} if mode is UpdateMode.MERGE else props)

    def _delete(self, rows: dict[Key, Row], key: Key, if_match: str) -> None:
        self._matching(rows, key, if_match)
        del rows[key]

    @staticmethod
    def _matching(rows: dict[Key, Row], key: Key, if_match: str) -> Row:
        current = rows.get(key)
        if current is None:
            raise _not_found()
        if if_match != "*" and if_match != current.etag:
            raise _modified()
        return current

    def _write(self, rows: dict[Key, Row], props: dict[str, Any], *, commit: bool = False) -> str:
        etag = _new_etag()
        rows[(props["PartitionKey"], props["RowKey"])] = Row(props, etag, datetime.now(UTC))
        if commit:
            self.rows = rows
        return etag


def _parse_operation(op: Operation) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(kind, stored properties, kwargs) as TableBatchOperations.add_operation reads a tuple."""
    kind, entity, kwargs = (op[0], op[1], op[2]) if len(op) == 3 else (op[0], op[1], {})
    kind = str(getattr(kind, "value", kind)).lower()
    if kind not in ("create", "update", "upsert", "delete"):
        raise ValueError(f"Unrecognized operation: {op[0]}")
    if kind == "delete":
        props = {
            "PartitionKey": _check_key("PartitionKey", entity["PartitionKey"]),
            "RowKey": _check_key("RowKey", entity["RowKey"]),
        }
    else:
        props = _properties(entity)
    return kind, props, dict(kwargs)


# --- $filter ----------------------------------------------------------------------------------------------

Predicate = Callable[[Mapping[str, Any]], bool]

_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
}
_WORD_TOKENS = re.compile(r"\(|\)|'(?:[^']|'')*'|[^()']+")
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?L?")


@dataclass(frozen=True)
class _Literal:
    value: Any


@dataclass
class _Parser:
    tokens: list[str | _Literal]
    position: int = field(default=0)

    def peek(self) -> str | _Literal | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str | _Literal:
        token = self.peek()
        if token is None:
            raise ValueError("unexpected end of filter")
        self.position += 1
        return token

    def expression(self) -> Predicate:
        terms = [self.conjunction()]
        while self.peek() == "or":
            self.take()
            terms.append(self.conjunction())
        return terms[0] if len(terms) == 1 else lambda props: any(term(props) for term in terms)

    def conjunction(self) -> Predicate:
        factors = [self.factor()]
        while self.peek() == "and":
            self.take()
            factors.append(self.factor())
        return factors[0] if len(factors) == 1 else lambda props: all(factor(props) for factor in factors)

    def factor(self) -> Predicate:
        token = self.take()
        if token == "not":
            inner = self.factor()
            return lambda props: not inner(props)
        if token == "(":
            inner = self.expression()
            if self.take() != ")":
                raise ValueError("expected ')'")
            return inner
        if not isinstance(token, str) or token in _COMPARISONS or token in ("and", "or", ")"):
            raise ValueError(f"expected a property name, found {token!r}")
        op, literal = self.take(), self.take()
        if not isinstance(op, str) or op not in _COMPARISONS or not isinstance(literal, _Literal):
            raise ValueError(f"expected '<property> eq|ne|lt|le|gt|ge <value>' after {token!r}")
        return _comparison(token, _COMPARISONS[op], literal.value)


def _comparable(a: Any, b: Any) -> bool:
    """The service compares a property with a literal of its own type only; a property of another type, or
    a missing one, never matches (not even `ne`)."""
    numeric = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, numeric) and isinstance(b, numeric):
        return True
    return type(a) is type(b) or (isinstance(a, str) and isinstance(b, str))


def _comparison(name: str, compare: Callable[[Any, Any], bool], literal: Any) -> Predicate:
    def matches(props: Mapping[str, Any]) -> bool:
        if name not in props:
            return False
        value = props[name]
        if isinstance(value, EntityProperty):
            value = value.value
        return _comparable(value, literal) and compare(value, literal)

    return matches


def _parameter(value: Any) -> _Literal:
    """A parameter as `_parameter_filter_substitution` renders it (note `value in [True, False]`: the SDK
    sends 0 and 1, and 0.0 and 1.0, as the booleans false and true)."""
    if value in [True, False]:
        return _Literal(bool(value))
    if isinstance(value, int | float | datetime | uuid.UUID | bytes):
        return _Literal(value)
    if not isinstance(value, str):
        raise TypeError(f"the SDK cannot substitute a parameter of type {type(value).__name__}")
    return _Literal(str(value))


def _word_literal(word: str) -> str | _Literal:
    if word.startswith("'"):
        return _Literal(word[1:-1].replace("''", "'"))
    if word in ("true", "false"):
        return _Literal(word == "true")
    if _NUMBER.fullmatch(word):
        text = word.rstrip("L")
        return _Literal(float(text) if any(c in text for c in ".eE") else int(text))
    return word


def compile_filter(query_filter: str, parameters: Mapping[str, Any]) -> Predicate:
    """A predicate over stored properties for an OData filter, read the way the SDK and the service do:
    the SDK splits the filter at single spaces and replaces each word that starts with `@` by its
    parameter (so `(@a` or `@a)` is not substituted: a KeyError here, a bad request there); then
    comparisons (eq ne lt le gt ge) of a property with a literal, `and`, `or`, `not` and parentheses.
    Quoted literals without spaces are allowed; alertgate uses parameters."""
    tokens: list[str | _Literal] = []
    for word in query_filter.split(" "):
        if not word:
            if parameters:
                raise ValueError("an empty word in the filter (two spaces): the SDK fails on it")
            continue
        if parameters and word[0] == "@":
            tokens.append(_parameter(parameters[word[1:]]))
            continue
        tokens.extend(_word_literal(piece) for piece in _WORD_TOKENS.findall(word))
    parser = _Parser(tokens)
    predicate = parser.expression()
    if parser.peek() is not None:
        raise ValueError(f"unexpected {parser.peek()!r} in filter {query_filter!r}")
    return predicate


# --- MemoryTable: the StateStore -------------------------------------------------------------------------

READS = frozenset({"get", "query"})
WRITES = frozenset({"insert", "replace", "delete", "transact"})


@dataclass
class _Injected:
    kind: str
    remaining: int
    landed: bool
    exc: BaseException | None

    def matches(self, method: str) -> bool:
        if self.remaining <= 0:
            return False
        if self.kind == "any":
            return True
        if self.kind == "write":
            return method in WRITES
        if self.kind == "read":
            return method in READS
        return self.kind == method


class MemoryTable:
    """The StateStore protocol in memory, with StateTable's semantics over Table Storage:

    - insert → the new ETag, or None if the row exists;
    - replace(entity, etag) → the new ETag, or None if the row is missing or (etag given) its ETag moved;
    - delete(pk, rk, etag=None) → True (a missing row counts as deleted), False if etag given and moved;
    - transact(ops) → each operation's new ETag (None for a delete), or None if any condition failed
      (409, 412, or a row missing for an update or delete), applied all or nothing;
    - query(filter, parameters, select) → matching entities in key order, `select` limiting properties.

    Entities come back as TableEntity with `.metadata["etag"]`. `round_trips` counts calls (a
    transaction is one). `fail_next` makes calls end in StorageUnavailable (or a given exception), as
    the seam does when its retries run out; with `landed=True` the write takes effect first, as when the
    seam gave up on a write whose answer was lost.
    """

    def __init__(self, name: str = "memory") -> None:
        self._name = name
        self.state = TableState()
        self.round_trips = 0
        self.calls: Counter[str] = Counter()
        self.injected = 0  # faults raised so far
        self._faults: list[_Injected] = []

    @property
    def name(self) -> str:
        return self._name

    # -- test helpers (no round trip, no faults) ----------------------------------------------------------

    def fail_next(
        self, kind: str = "write", n: int = 1, *, landed: bool = False, exc: BaseException | None = None
    ) -> None:
        """Make the next `n` calls of `kind` fail: a method name (get, query, insert, replace, delete,
        transact), "write", "read" or "any". They raise `exc`, or StorageUnavailable; with `landed` a write
        is applied first (its answer lost)."""
        if kind not in READS | WRITES | {"write", "read", "any"}:
            raise ValueError(f"unknown kind {kind!r}")
        self._faults.append(_Injected(kind, n, landed, exc))

    def peek(self, partition_key: str, row_key: str) -> TableEntity | None:
        return self.state.read(partition_key, row_key)

    def put(self, entity: Entity) -> str:
        """Write a row unconditionally, as another writer would: its new ETag."""
        return self.state.put(entity)

    def rows(self) -> list[TableEntity]:
        return self.state.all()

    def size(self) -> int:
        """How many rows there are (not __len__: an empty table must not be falsy in `table or default`)."""
        return len(self.state.rows)

    # -- the protocol ---------------------------------------------------------------------------------------

    async def get(self, partition_key: str, row_key: str) -> TableEntity | None:
        return self._call("get", lambda: self.state.read(partition_key, row_key))

    async def query(
        self, query: str, parameters: dict[str, Any], select: list[str] | None = None
    ) -> list[TableEntity]:
        return self._call("query", lambda: self.state.query(query, parameters, select))

    async def insert(self, entity: Entity) -> str | None:
        def insert() -> str | None:
            try:
                return self.state.create(entity)
            except TableFailure as failure:
                _settled(failure)
                return None

        return self._call("insert", insert)

    async def replace(self, entity: Entity, etag: str | None) -> str | None:
        def replace() -> str | None:
            condition = MatchConditions.Unconditionally if etag is None else MatchConditions.IfNotModified
            try:
                return self.state.update(entity, UpdateMode.REPLACE, etag, condition)
            except TableFailure as failure:
                _settled(failure)
                return None

        return self._call("replace", replace)

    async def delete(self, partition_key: str, row_key: str, etag: str | None = None) -> bool:
        def delete() -> bool:
            condition = MatchConditions.Unconditionally if etag is None else MatchConditions.IfNotModified
            try:
                self.state.delete(partition_key, row_key, etag, condition)
            except TableFailure as failure:
                if failure.status == 404:
                    return True
                _settled(failure)  # raises unless the condition failed
                return False
            return True

        return self._call("delete", delete)

    async def transact(
        self, operations: Sequence[Operation], sent: Callable[[], None] | None = None
    ) -> list[str | None] | None:
        def transact() -> list[str | None] | None:
            if sent is not None:
                sent()
            try:
                results = self.state.transaction(operations)
            except TableFailure as failure:
                if failure.status in (404, 409, 412):
                    return None
                raise _transaction_error(failure) from None
            return [
                None if str(op[0]).lower() == "delete" else str(meta["etag"])
                for op, meta in zip(operations, results, strict=True)
            ]

        return self._call("transact", transact)

    def _call(self, method: str, apply: Callable[[], T]) -> T:
        self.round_trips += 1
        self.calls[method] += 1
        fault = next((f for f in self._faults if f.matches(method)), None)
        if fault is None:
            return apply()
        fault.remaining -= 1
        self.injected += 1
        if fault.landed and method in WRITES:
            _quietly(apply)  # the answer is lost either way
        raise fault.exc or StorageUnavailable(f"{method} in table {self.name}: injected fault")


def _settled(failure: TableFailure) -> None:
    """A failed condition is None for the caller; anything else (a bad request) is raised as the SDK does."""
    if failure.status in (404, 409, 412):
        return None
    raise _sdk_error(failure) from None


# --- FakeTableClient: the SDK's TableClient, with scripted faults -----------------------------------------


class Fault(enum.Enum):
    """What goes wrong with one call to FakeTableClient."""

    NOT_SENT = "not sent"  # ServiceRequestError before anything is sent: certainly not applied
    LOST = "answer lost"  # applied, then ServiceResponseError: the caller cannot know it was
    UNAVAILABLE = "503"  # HttpResponseError 503 (ServerBusy), not applied
    LATE = "lands late"  # ServiceResponseError now; applied just before the next call of the same method


Hook = Callable[[], object]
Script = Fault | BaseException | Hook


@dataclass
class _Scripted:
    what: Script
    method: str | None
    at: int | None
    remaining: int

    def matches(self, method: str, index: int) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method == method)
            and (self.at is None or self.at == index)
        )


class FakeTableClient:
    """The calls StateTable makes on azure.data.tables.aio.TableClient, over a TableState, answering and
    failing with the SDK's own exceptions (ResourceNotFoundError, ResourceExistsError,
    ResourceModifiedError, TableTransactionError, HttpResponseError, ServiceRequestError,
    ServiceResponseError), and with the SDK's quirks (delete_entity of a missing row succeeds; a
    condition is refused unless etag and match_condition agree).

    `inject(what, method=..., at=..., times=...)` scripts a call: a Fault, an exception raised before
    applying, or a hook run before applying (another writer getting in first). `calls` lists every
    method called, in order; `at` is an index into it.
    """

    def __init__(self, table_name: str = "FakeTable", state: TableState | None = None) -> None:
        self.table_name = table_name
        self.state = state or TableState()
        self.calls: list[str] = []
        self.closed = False
        self._script: list[_Scripted] = []
        self._late: dict[str, list[Callable[[], object]]] = {}

    def inject(
        self, what: Script, *, method: str | None = None, at: int | None = None, times: int = 1
    ) -> None:
        self._script.append(_Scripted(what, method, at, times))

    def count(self, method: str) -> int:
        return self.calls.count(method)

    # -- the TableClient surface -------------------------------------------------------------------------

    async def get_entity(self, partition_key: str, row_key: str, **kwargs: Any) -> TableEntity:
        def get() -> TableEntity:
            entity = self.state.read(partition_key, row_key)
            if entity is None:
                raise _sdk_error(_not_found())
            return entity

        return self._call("get_entity", get)

    async def create_entity(self, entity: Entity, **kwargs: Any) -> dict[str, Any]:
        return self._call(
            "create_entity", lambda: _metadata(self._refused(lambda: self.state.create(entity)))
        )

    async def update_entity(
        self,
        entity: Entity,
        mode: UpdateMode = UpdateMode.MERGE,
        *,
        etag: str | None = None,
        match_condition: MatchConditions | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        return self._call(
            "update_entity",
            lambda: _metadata(self._refused(lambda: self.state.update(entity, mode, etag, match_condition))),
        )

    async def delete_entity(
        self,
        partition_key: str,
        row_key: str,
        *,
        etag: str | None = None,
        match_condition: MatchConditions | None = None,
        **kwargs: Any,
    ) -> None:
        def delete() -> None:
            try:
                self.state.delete(partition_key, row_key, etag, match_condition)
            except TableFailure as failure:
                if failure.status != 404:  # the SDK swallows a 404: deleting a missing row succeeds
                    raise _sdk_error(failure) from None

        self._call("delete_entity", delete)

    async def submit_transaction(
        self, operations: Sequence[Operation], **kwargs: Any
    ) -> list[dict[str, Any]]:
        def submit() -> list[dict[str, Any]]:
            try:
                return self.state.transaction(operations)
            except TableFailure as failure:
                raise _transaction_error(failure) from None

        return self._call("submit_transaction", submit)

    def query_entities(
        self,
        query_filter: str,
        *,
        parameters: dict[str, Any] | None = None,
        select: str | list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[TableEntity]:
        """An async iterator, like the SDK's pager: the request goes out when iteration starts."""
        names = select.split(",") if isinstance(select, str) else select

        async def pages() -> AsyncIterator[TableEntity]:
            for entity in self._call(
                "query_entities", lambda: self.state.query(query_filter, parameters, names)
            ):
                yield entity

        return pages()

    async def close(self) -> None:
        self.closed = True

    # -- faults -----------------------------------------------------------------------------------------

    @staticmethod
    def _refused(write: Callable[[], T]) -> T:
        try:
            return write()
        except TableFailure as failure:
            raise _sdk_error(failure) from None

    def _call(self, method: str, apply: Callable[[], T]) -> T:
        index = len(self.calls)
        self.calls.append(method)
        for late in self._late.pop(method, []):
            late()
        scripted = next((s for s in self._script if s.matches(method, index)), None)
        if scripted is None:
            return apply()
        scripted.remaining -= 1
        what = scripted.what
        if isinstance(what, BaseException):
            raise what
        if what is Fault.NOT_SENT:
            # As azure-core reports a connection that could not be made (the only kind of
            # ServiceRequestError that proves nothing was sent).
            raise ServiceRequestError(
                f"{method}: cannot connect to host (injected)", error=aiohttp.ConnectionTimeoutError()
            )
        if what is Fault.UNAVAILABLE:
            raise http_error(
                HttpResponseError, 503, "ServerBusy", "The server is currently unable to receive requests."
            )
        if what is Fault.LOST:
            _quietly(apply)
            raise ServiceResponseError(f"{method}: connection closed before the answer arrived (injected)")
        if what is Fault.LATE:
            self._late.setdefault(method, []).append(lambda: _quietly(apply))
            raise ServiceResponseError(
                f"{method}: read timed out (injected); the request is still on its way"
            )
        assert callable(what)
        what()
        return apply()


def _quietly(apply: Callable[[], object]) -> None:
    """Apply a call whose answer nobody will see (refused or not)."""
    with contextlib.suppress(HttpResponseError):
        apply()


def _metadata(etag: str) -> dict[str, Any]:
    """What create_entity/update_entity return (`_trim_service_metadata`)."""
    return {"date": datetime.now(UTC), "etag": etag, "version": "2019-02-02"}
