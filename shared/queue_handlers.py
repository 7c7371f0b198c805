"""Queue- and timer-triggered entry points: the inbound requests queue, the chunks worker, the poison
queues, the sweep, the purge and the telemetry snapshot; each resolves its tenant and hands over to that
tenant's services.

The inbound queue (REQUESTS_QUEUE, docs/contracts.md §2) takes what other services put on it: a batchUpdate body,
optionally with `idempotencyKey` (the queue's stand-in for the header), or `{"sentinelIncident": {...}}`.
It gets the same validation and idempotency as HTTP. A message that can never succeed (invalid) becomes a
Failed operation with its reasons, whose id is derived from the message id (UUID v5) so a redelivery
records nothing new, and the message is consumed: raising would only walk it to the poison queue.

None of these handlers raises for a state it can resolve; an exception that does escape (storage down)
leaves the message to the host's retries and, in the end, to a poison handler here.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

from shared.errors import FieldError, RequestRejected
from shared.outcomes import IncidentOutcome, InProgress, KeyReused, NothingToDo, Refused, Replayed, describe
from shared.tenants import HOME

if TYPE_CHECKING:
    from shared.runtime import Runtime
    from shared.worker import Worker

log = logging.getLogger(__name__)

# Fixed namespace for operation ids derived from queue message ids (uuid5): same message, same id.
QUEUE_NAMESPACE = uuid.UUID("6b0f3a52-8d1e-4f4c-9a57-2f1f3c9b7e10")
IN_PROGRESS_REQUEUE_SECONDS = 5.0
OPERATIONS_PATH = "/api/operations/"  # queue callers poll through the HTTP API; no host is known here


def operation_id_for_message(message_id: str) -> str:
    return str(uuid.uuid5(QUEUE_NAMESPACE, message_id))


def _pop_key(document: dict[str, Any]) -> Any:
    for name in list(document):
        if name.lower() == "idempotencykey":
            return document.pop(name)
    return None


async def handle_request_message(message_id: str, body: bytes, dequeue_count: int) -> str:
    """One inbound message → an accepted operation, a replay, a re-enqueue, or a Failed record."""
    from shared import runtime
    from shared.api import submit_incident, workspace_tenant
    from shared.intake import Submission
    from shared.validation import (
        ValidationRules,
        parse_json_body,
        validate_batch_update,
        validate_idempotency_key,
    )

    rt = await runtime.ready()
    settings = rt.settings
    caller = {"authentication": "queue", "queue": settings.requests_queue, "messageId": message_id}
    try:
        document = parse_json_body(body, "application/json", settings.max_body_bytes)
        named = _pop_tenant(document, rt.tenants)
        incident = _sentinel_incident(document)
        if incident is not None:
            tenant = named or workspace_tenant(incident, settings)
            answer = await submit_incident(
                incident, caller, OPERATIONS_PATH, respond_async=True, tenant=tenant
            )
            return await _after_submit(message_id, body, caller, answer)
        raw_key = _pop_key(document) if isinstance(document, dict) else None
        if raw_key is not None and not isinstance(raw_key, str):
            raise RequestRejected(
                400,
                "Invalid idempotencyKey",
                "idempotencyKey must be a string.",
                [FieldError("idempotencyKey", "must be a string")],
            )
        key = _queue_key(raw_key, validate_idempotency_key)
        rules = ValidationRules(settings.alert_id_pattern, settings.max_alerts_per_request)
        update = validate_batch_update(document, rules)
    except RequestRejected as exc:
        return await _record_invalid(message_id, caller, exc)
    submission = Submission(
        update=update,
        source="queue",
        caller=caller,
        operations_url=OPERATIONS_PATH,
        explicit_key=key,
        respond_async=True,
    )
    outcome = await rt.tenant(named or HOME).intake.submit(submission)
    return await _after_submit(message_id, body, caller, outcome)


def _pop_tenant(document: Any, served: dict[str, Any]) -> str | None:
    """A message's top-level `tenant` (docs/contracts.md §8), taken out of the body; None when absent.
    One this deployment does not serve refuses the message: it becomes a Failed operation in the home
    tenant, naming the tenant."""
    if not isinstance(document, dict):
        return None
    name = next((k for k in document if k.lower() == "tenant"), None)
    if name is None:
        return None
    value = document.pop(name)
    if not isinstance(value, str):
        raise RequestRejected(
            400, "Invalid tenant", "tenant must be a string.", [FieldError("tenant", "must be a string")]
        )
    if value != HOME and value not in served:
        raise RequestRejected(
            404,
            "Unknown tenant",
            f"This deployment serves no tenant named {value!r}; nothing was sent.",
            [FieldError("tenant", f"{value!r} is not a tenant this deployment serves")],
        )
    return value


def _sentinel_incident(document: Any) -> Any:
    """The incident of a `{"sentinelIncident": {...}}` message (key matched case-insensitively), else None."""
    if not isinstance(document, dict):
        return None
    for name, value in document.items():
        if name.lower() == "sentinelincident":
            return value
    return None


async def _after_submit(
    message_id: str, body: bytes, caller: dict[str, Any], outcome: IncidentOutcome
) -> str:
    """What an inbound message's outcome means for the message: consumed, re-enqueued or recorded Failed."""
    from shared import runtime

    if isinstance(outcome, InProgress):
        rt = await runtime.ready()
        await rt.queues.resend_request(body.decode("utf-8"), IN_PROGRESS_REQUEUE_SECONDS)
        log.info("inbound message %s: its key is in progress elsewhere; re-enqueued", message_id)
        return "requeued"
    if isinstance(outcome, KeyReused):
        exc = RequestRejected(
            422,
            "idempotencyKey reused",
            "This idempotencyKey was already used with a different request body.",
            [FieldError("idempotencyKey", "was used before with a different request body")],
        )
        return await _record_invalid(message_id, caller, exc)
    if isinstance(outcome, Refused):
        exc = RequestRejected(outcome.status, outcome.title, outcome.detail, outcome.errors)
        return await _record_invalid(message_id, caller, exc)
    replayed = " (replay: nothing sent)" if isinstance(outcome, Replayed) else ""
    log.info("inbound message %s: %s%s", message_id, describe(outcome), replayed)
    if isinstance(outcome, NothingToDo):
        return "nothing-to-do"
    return "replayed" if isinstance(outcome, Replayed) else "accepted"


def _queue_key(raw: str | None, validate: Any) -> str | None:
    try:
        return validate(raw)  # type: ignore[no-any-return]
    except RequestRejected as exc:
        raise RequestRejected(
            400,
            "Invalid idempotencyKey",
            exc.detail.replace("header", "field"),
            [FieldError("idempotencyKey", "must be 1-255 visible ASCII characters")],
        ) from None


async def _record_invalid(message_id: str, caller: dict[str, Any], exc: RequestRejected) -> str:
    from shared import runtime

    rt = await runtime.ready()
    operation_id = operation_id_for_message(message_id)
    errors = [e.as_dict() for e in exc.errors] or [{"field": "body", "message": exc.detail}]
    await rt.tenant(HOME).ledger.record_invalid(
        operation_id, "queue", caller, errors, 400 if exc.status != 422 else 422
    )
    log.warning(
        "inbound message %s is invalid; recorded as Failed operation %s: %s",
        message_id,
        operation_id,
        exc.detail,
    )
    return "invalid"


async def handle_chunk_message(body: bytes) -> str:
    from shared import runtime

    rt = await runtime.ready()
    try:
        message = json.loads(body)
        chunk_id, token = str(message["chunk"]), str(message["token"])
        tenant = str(message.get("tenant") or HOME)
    except (ValueError, KeyError, TypeError, AttributeError):
        log.error("chunks queue: dropped a message that is not a chunk reference: %r", body[:200])
        return "malformed"
    if tenant not in rt.tenants:
        # Its tenant was taken out of DEFENDER_TENANTS: the chunk stays pending in that tenant's ledger
        # partition, and is sent again by the sweep if the tenant comes back.
        log.error(
            "chunks queue: chunk %s is of tenant %r, which this deployment no longer serves", chunk_id, tenant
        )
        return "unknown-tenant"
    worker: Worker = rt.tenant(tenant).worker
    return await worker.on_message(chunk_id, token)


async def handle_chunk_poison(body: bytes) -> str:
    from shared import runtime

    rt = await runtime.ready()
    try:
        message = json.loads(body)
        chunk_id = str(message["chunk"])
        tenant = str(message.get("tenant") or HOME)
    except (ValueError, KeyError, TypeError, AttributeError):
        _poisoned(rt, HOME, "chunks")
        log.error("chunks poison queue: dropped a message that is not a chunk reference: %r", body[:200])
        return "malformed"
    if tenant not in rt.tenants:
        _poisoned(rt, tenant, "chunks")
        log.error(
            "chunks poison queue: chunk %s is of tenant %r, which this deployment no longer serves",
            chunk_id,
            tenant,
        )
        return "unknown-tenant"
    return "failed" if await rt.tenant(tenant).worker.on_poison(chunk_id) else "already-finished"


async def handle_request_poison(message_id: str, body: bytes) -> str:
    """An inbound message that kept failing: a Failed operation says so, with the message id (in the home
    tenant: a message that could not be handled may not have a tenant anyone can trust)."""
    from shared import runtime

    rt = await runtime.ready()
    _poisoned(rt, _tenant_named_in(body, rt), "requests")
    caller = {"authentication": "queue", "messageId": message_id}
    snippet = body[:300].decode("utf-8", errors="replace")
    exc = RequestRejected(
        400,
        "Poison message",
        f"The message failed repeatedly and reached the poison queue: {snippet}",
        [FieldError("body", "failed repeatedly (poison queue)")],
    )
    return await _record_invalid(message_id, caller, exc)


def _poisoned(rt: Runtime, tenant: str, queue: str) -> None:
    if rt.telemetry is not None:
        rt.telemetry.tenant(tenant).poison(queue)


def _tenant_named_in(body: bytes, rt: Runtime) -> str:
    """The top-level `tenant` an inbound message names, if it is one served; otherwise the home tenant."""
    try:
        named = json.loads(body).get("tenant")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return HOME
    return named if isinstance(named, str) and named in rt.tenants else HOME


async def run_telemetry_snapshot(now: float) -> dict[str, int]:
    """The minute timer's gauges (docs/telemetry.md); the backlog per tenant, for the log line."""
    from shared import runtime

    return await snapshot(await runtime.ready(), now)


async def snapshot(rt: Runtime, now: float) -> dict[str, int]:
    """Every tenant's budgets and backlog, every queue's depth, recorded as gauges."""
    backlog: dict[str, int] = {}
    if rt.telemetry is None:
        return backlog
    for name, tenant in rt.tenants.items():
        figures = rt.telemetry.tenant(name)
        for channel in (tenant.batch_update, tenant.patch):
            if channel is not None:
                figures.budget(channel.name, await channel.limiter.snapshot())
        unfinished = [c for c in await tenant.ledger.all_pending() if not c.finished]
        figures.backlog(unfinished, now)
        backlog[name] = len(unfinished)
    rt.telemetry.queue_depths(await rt.queues.depths())
    return backlog


async def run_sweep() -> dict[str, int]:
    """The sweep timer: every tenant's sweep (shared.worker), counts added up."""
    from shared import runtime

    rt = await runtime.ready()
    totals = {"staleSends": 0, "requeued": 0, "settled": 0}
    for tenant in rt.tenants.values():
        for name, count in (await tenant.worker.sweep()).items():
            totals[name] = totals.get(name, 0) + count
    return totals


async def run_purge(now: float) -> tuple[int, int]:
    """The daily purge: expired keys, and old operations, results and journal entries of every tenant."""
    from shared import runtime

    rt = await runtime.ready()
    settings = rt.settings
    keys = records = 0
    for tenant in rt.tenants.values():
        keys += await tenant.keys.purge(now)
        records += await tenant.ledger.purge(
            now - settings.idempotency_ttl_seconds, now - settings.derived_key_ttl_seconds
        )
    return keys, records
