"""alertgate's HTTP API as plain async functions: request in, response out, no Functions types.

function_app.py (and the development host through it) only translates to and from these types, so the
behaviour is the same under Core Tools, in Azure and locally. Every answer that is not a success is
`application/problem+json` (RFC 9457) with `errors: [{field, message}]`; an unexpected exception is
logged with an incident id and answered as a problem naming that id, never as a bare 500; storage being
unreachable is a 503 with Retry-After, since it passes and the caller should simply retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from shared.errors import FieldError, RequestRejected, StateContention, StorageUnavailable
from shared.http import ApiRequest, ApiResponse, json_response, problem, rejected
from shared.outcomes import Accepted, IncidentOutcome, InProgress, KeyReused, NothingToDo, Refused, Replayed
from shared.tenants import HOME, TenantServices

if TYPE_CHECKING:
    from shared.ledger import Operation
    from shared.runtime import Runtime
    from shared.settings import Settings
    from shared.tenant_access import Caller

log = logging.getLogger(__name__)

HEALTH_CHECK_SECONDS = 5.0
STORAGE_RETRY_AFTER_SECONDS = 5  # a storage restart or blip usually passes within seconds


async def guarded(
    handler: Callable[[ApiRequest], Awaitable[ApiResponse]], request: ApiRequest
) -> ApiResponse:
    """Run a handler; turn any exception that escaped it into a logged problem+json 500."""
    try:
        return await handler(request)
    except RequestRejected as exc:
        return rejected(exc)
    except StateContention as exc:
        log.warning("contention on shared state handling %s %s: %s", request.method, request.url, exc)
        return problem(
            503,
            "state-contention",
            "Busy",
            "Too many requests changed the same shared state at once; retry after the Retry-After delay. "
            "If the request was accepted, its operation goes on; re-sending with the same Idempotency-Key "
            "is safe.",
            headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))},
        )
    except Exception as exc:
        incident = str(uuid.uuid4())
        if isinstance(exc, StorageUnavailable) or _storage_unreachable(exc):
            log.warning(
                "storage unreachable handling %s %s (incident %s): %s",
                request.method,
                request.url,
                incident,
                exc,
            )
            return problem(
                503,
                "storage-unavailable",
                "Storage unavailable",
                "alertgate could not reach the Table or Queue storage it keeps its state in; retry after the "
                "Retry-After delay. If the request was accepted, its operation goes on; re-sending with the "
                f"same Idempotency-Key is safe (incident {incident}).",
                headers={"Retry-After": str(STORAGE_RETRY_AFTER_SECONDS)},
                extra={"incident": incident},
            )
        log.exception("unexpected error handling %s %s (incident %s)", request.method, request.url, incident)
        return problem(
            500,
            "internal-error",
            "Internal error",
            f"alertgate failed unexpectedly; the log holds the details under incident {incident}. "
            "If the request was accepted, its operation goes on; re-sending with the same Idempotency-Key is safe.",
            extra={"incident": incident},
        )


def _storage_unreachable(exc: Exception) -> bool:
    """A storage call that could not connect or got no answer, or storage answering 5xx: the state store is
    away for a while (a restart, a network blip), which a caller should ride out rather than report as a bug.
    Calls to MDE never raise (shared.channels turns their failures into results)."""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return True
    return isinstance(exc, HttpResponseError) and (exc.status_code or 0) >= 500


def render(outcome: IncidentOutcome) -> ApiResponse:
    """An intake outcome as HTTP (docs/contracts.md §1)."""
    if isinstance(outcome, Accepted | Replayed):
        return outcome.answer
    if isinstance(outcome, InProgress):
        return problem(
            409,
            "request-in-progress",
            "Request in progress",
            "A request with this idempotency key is still being processed; retry after the Retry-After delay.",
            headers={"Retry-After": str(outcome.retry_after)},
            extra={"operationId": outcome.operation_id},
        )
    if isinstance(outcome, KeyReused):
        return problem(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "This Idempotency-Key was already used with a different request body; use a new key for a new "
            "request.",
            errors=[FieldError("Idempotency-Key", "was used before with a different request body")],
            extra={"keyKind": outcome.key_kind},
        )
    if isinstance(outcome, Refused):
        return problem(
            outcome.status,
            outcome.kind,
            outcome.title,
            outcome.detail,
            errors=outcome.errors,
            extra=outcome.extra,
        )
    return json_response(200, outcome.document)


def tenant_of(request: ApiRequest, settings: Settings | None = None) -> str:
    """The tenant a request acts on, decided here at the edge before any service is touched: the route's
    `{tenant}` (the plain routes: home). A 404 problem for a tenant this deployment does not serve, a 403
    when the caller may not act on it (shared.tenant_access)."""
    from shared.tenant_access import check_access, tenant_named

    if settings is None:
        from shared import runtime

        settings = runtime.settings()
    tenant = tenant_named(request.route_params.get("tenant"), settings.defender_tenants)
    check_access(tenant, access_of(request, settings), settings.require_tenant_roles)
    return tenant


def access_of(request: ApiRequest, settings: Settings) -> Caller:
    from shared.tenant_access import caller_from_headers

    return caller_from_headers(
        request.header("X-MS-CLIENT-PRINCIPAL"),
        request.header("X-MS-CLIENT-PRINCIPAL-ID") or request.header("X-MS-CLIENT-PRINCIPAL-NAME"),
        settings.app_service_auth_enabled,
    )


def caller_of(request: ApiRequest, auth_enabled: bool | None = None) -> dict[str, Any]:
    """Who called: App Service authentication's principal when present, otherwise a function key.

    The X-MS-CLIENT-PRINCIPAL-* headers are believed only when App Service authentication is on
    (WEBSITE_AUTH_ENABLED, `auth_enabled` defaults to the setting): then App Service removes any a caller
    sent and sets its own. Without it they are whatever the caller wrote, so the caller is the function
    key's holder and the headers are ignored."""
    if auth_enabled is None:
        from shared import runtime

        auth_enabled = runtime.settings().app_service_auth_enabled
    if not auth_enabled:
        return {"authentication": "functionKey"}
    name = request.header("X-MS-CLIENT-PRINCIPAL-NAME")
    principal_id = request.header("X-MS-CLIENT-PRINCIPAL-ID")
    if name or principal_id:
        return {
            "authentication": "entra",
            "principalName": name,
            "principalId": principal_id,
            "identityProvider": request.header("X-MS-CLIENT-PRINCIPAL-IDP"),
        }
    return {"authentication": "functionKey"}


def operations_url(request: ApiRequest) -> tuple[str, str]:
    """Where this app's operations live, and the `?code=` to carry over so a poller can use the same key."""
    parts = urlsplit(request.url)
    path = parts.path
    prefix = path[: path.index("/api/") + 5] if "/api/" in path else "/api/"
    code = request.query.get("code")
    return (
        f"{parts.scheme}://{parts.netloc}{prefix}operations/",
        f"?code={quote(code, safe='')}" if code else "",
    )


def wants_async(request: ApiRequest) -> bool:
    prefer = request.header("Prefer") or ""
    return any(p.strip().lower() == "respond-async" for p in prefer.split(","))


# --- POST /api/alerts/batchUpdate -------------------------------------------------------------------


async def batch_update(request: ApiRequest) -> ApiResponse:
    from shared import runtime
    from shared.intake import Submission
    from shared.validation import (
        ValidationRules,
        parse_json_body,
        validate_batch_update,
        validate_idempotency_key,
    )

    settings = runtime.settings()
    tenant = tenant_of(request, settings)
    key = validate_idempotency_key(request.header("Idempotency-Key"))
    document = parse_json_body(request.body, request.header("Content-Type"), settings.max_body_bytes)
    rules = ValidationRules(settings.alert_id_pattern, settings.max_alerts_per_request)
    update = validate_batch_update(document, rules)
    rt = await runtime.ready()
    base, query = operations_url(request)
    submission = Submission(
        update=update,
        source="http",
        caller=caller_of(request),
        operations_url=base,
        location_query=query,
        explicit_key=key,
        respond_async=wants_async(request),
    )
    return render(await rt.tenant(tenant).intake.submit(submission))


# --- GET /api/operations/{operationId} ---------------------------------------------------------------


async def get_operation(request: ApiRequest) -> ApiResponse:
    from shared import runtime
    from shared.operations import is_operation_id, resource, retry_after_seconds, status_of

    operation_id = request.route_params.get("operationId", "")
    rt = await runtime.ready()
    found = (
        await _find_operation(rt, operation_id, access_of(request, rt.settings))
        if is_operation_id(operation_id)
        else None
    )
    if found is None:
        return problem(
            404,
            "operation-not-found",
            "No such operation",
            f"There is no operation {operation_id!r} (operations are kept for "
            f"{rt.settings.idempotency_ttl_seconds:g} seconds).",
        )
    tenant, operation = found
    ledger = rt.tenant(tenant).ledger
    chunks = await ledger.chunks_of(operation)
    state = status_of(operation, chunks)
    document = {**resource(operation, chunks), "tenant": tenant}
    if state.terminal:
        return json_response(state.http_status, document)
    base, query = operations_url(request)
    headers = {"Location": f"{base}{operation_id}{query}", "Retry-After": str(retry_after_seconds(chunks))}
    return json_response(202, document, headers)


async def _find_operation(rt: Runtime, operation_id: str, caller: Caller) -> tuple[str, Operation] | None:
    """The operation and its tenant, looked up in every tenant the caller may act on at once (one round
    trip); one the caller may not act on is not found, so its existence is not given away either."""
    from shared.tenant_access import may_act_on

    names = [n for n in rt.tenants if may_act_on(n, caller, rt.settings.require_tenant_roles)]
    found = await asyncio.gather(*(rt.tenant(n).ledger.operation(operation_id) for n in names))
    for name, operation in zip(names, found, strict=True):
        if operation is not None:
            return name, operation
    return None


# --- GET /api/health -----------------------------------------------------------------------------------


async def health(request: ApiRequest) -> ApiResponse:
    """Storage reachable, a token obtainable, the budget left and the queue depths; 503 names what is not."""
    from shared import runtime

    rt = await runtime.runtime()
    probes = {
        "storage": _storage_check(rt),
        "token": _token_check(rt),
        "budget": _budget(rt.home),
        "queues": _queues(rt),
    }
    customers = [n for n in rt.tenants if n != HOME]
    results, tenants = await asyncio.gather(
        asyncio.gather(*(_probe(p) for p in probes.values())),
        asyncio.gather(*(_tenant_health(rt, name) for name in customers)),
    )
    checks = dict(zip(probes, results, strict=True))
    healthy = all(c["ok"] for c in checks.values())  # customer tenants report, but never make it 503
    document = {
        "status": "Healthy" if healthy else "Unhealthy",
        "checks": checks,
        "defender": {
            "batchUpdateUrl": rt.settings.batch_update_url,
            "maxAlertsPerCall": rt.home.batch_update.batch_limit.current,
            "patchMaxAlerts": rt.settings.patch_max_alerts if rt.home.patch else 0,
        },
        "tenants": dict(zip(customers, tenants, strict=True)),
    }
    return json_response(200 if healthy else 503, document)


async def _tenant_health(rt: Any, name: str) -> dict[str, Any]:
    """A customer tenant's token check and budgets; its failure is shown here, never as a 503."""
    services = rt.tenant(name)
    profile = rt.settings.defender_tenants[name]

    async def token() -> dict[str, Any]:
        await services.tokens.token()
        return {"ok": True, "scope": profile.token_scope}

    checks = await asyncio.gather(_probe(token()), _probe(_budget(services)))
    return {
        "tenantId": profile.tenant_id,
        "ok": all(c["ok"] for c in checks),
        "batchUpdateUrl": profile.batch_update_url,
        "maxAlertsPerCall": services.batch_update.batch_limit.current,
        "checks": {"token": checks[0], "budget": checks[1]},
    }


async def _probe(check: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """One check, bounded in time; its failure is reported, not raised."""
    try:
        return await asyncio.wait_for(check, timeout=HEALTH_CHECK_SECONDS)
    except Exception as exc:
        first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
        return {"ok": False, "error": f"{type(exc).__name__}: {first_line}"}


async def _storage_check(rt: Any) -> dict[str, Any]:
    async for _ in rt.table_service.list_tables(results_per_page=1):
        break
    return {"ok": True}


async def _token_check(rt: Any) -> dict[str, Any]:
    await rt.home.tokens.token()
    return {"ok": True, "scope": rt.settings.defender_token_scope}


async def _budget(tenant: TenantServices) -> dict[str, Any]:
    """Each channel's budget (docs/contracts.md §7); batchUpdate's also at the top, as before PATCH came."""
    batch = await _channel_budget(tenant.batch_update.limiter)
    patch = tenant.patch
    channels = {
        "batchUpdate": {"enabled": True, **batch},
        "patch": {"enabled": True, **await _channel_budget(patch.limiter)} if patch else {"enabled": False},
    }
    return {"ok": True, **batch, "channels": channels}


async def _channel_budget(limiter: Any) -> dict[str, Any]:
    snapshot = await limiter.snapshot()
    windows = [
        {"calls": w.calls, "seconds": w.seconds, "used": w.used, "remaining": w.remaining}
        for w in snapshot.windows
    ]
    return {"windows": windows, "blockedUntil": snapshot.blocked_until}


async def _queues(rt: Any) -> dict[str, Any]:
    return {"ok": True, "depths": await rt.queues.depths()}


# --- POST /api/sentinel/incidents --------------------------------------------------------------------


async def sentinel_incident(request: ApiRequest) -> ApiResponse:
    from shared import runtime
    from shared.validation import parse_json_body

    settings = runtime.settings()
    named = request.route_params.get("tenant")
    if named is not None:
        tenant_of(request, settings)  # an unknown tenant or a caller without access: before reading the body
    document = parse_json_body(request.body, request.header("Content-Type"), settings.max_body_bytes)
    tenant = named if named is not None else workspace_tenant(document, settings)
    tenant = tenant_of(_with_tenant(request, tenant), settings)
    base, query = operations_url(request)
    return render(
        await submit_incident(
            document, caller_of(request), base, query, respond_async=wants_async(request), tenant=tenant
        )
    )


def workspace_tenant(document: Any, settings: Settings) -> str:
    """The tenant whose `sentinelWorkspaceIds` holds an incident's `workspaceId` (the automation rule's
    body carries it at the top); the home tenant for any other workspace, or none."""
    if not isinstance(document, dict):
        return HOME
    workspace = next((v for k, v in document.items() if k.lower() == "workspaceid"), None)
    if not isinstance(workspace, str):
        return HOME
    workspace = workspace.strip().lower()
    for name, profile in settings.defender_tenants.items():
        if workspace in profile.sentinel_workspace_ids:
            return name
    return HOME


def _with_tenant(request: ApiRequest, tenant: str) -> ApiRequest:
    return dataclasses.replace(request, route_params={**request.route_params, "tenant": tenant})


async def submit_incident(
    document: Any,
    caller: dict[str, Any],
    operations_base: str,
    location_query: str = "",
    *,
    respond_async: bool = False,
    tenant: str = HOME,
) -> IncidentOutcome:
    """One Sentinel incident → one batchUpdate for its MDE alerts, with a key derived from the incident."""
    from shared import runtime
    from shared.intake import Submission
    from shared.sentinel import (
        OUTCOME_ALERTS_NOT_IN_PAYLOAD,
        OUTCOME_NO_DEFENDER_ALERTS,
        parse_incident,
        plan_update,
    )
    from shared.validation import ValidationRules, validate_batch_update

    settings = runtime.settings()
    incident = parse_incident(document)
    plan = plan_update(incident, runtime.sentinel_mapping(), settings.sentinel_default_assignee)
    about = {
        "incident": {"id": incident.arm_id, "number": incident.number, "title": incident.title},
        "skippedAlerts": [
            {
                "productName": a.product_name,
                "providerAlertId": a.provider_alert_id,
                "systemAlertId": a.system_alert_id,
            }
            for a in incident.skipped
        ],
    }
    if plan.outcome == OUTCOME_NO_DEFENDER_ALERTS:
        return NothingToDo({"status": "NoDefenderAlerts", **about})
    if plan.outcome == OUTCOME_ALERTS_NOT_IN_PAYLOAD:
        where = incident.provider_incident_url or "the incident in the Microsoft Defender portal"
        return Refused(
            422,
            "alerts-not-in-payload",
            "The incident's alerts are not in the payload",
            f"The incident reports {incident.alerts_count} alert(s) but the payload carries none (Defender-portal "
            f"incidents arrive like this), so nothing was sent. Close its alerts at {where}.",
            errors=[
                FieldError(
                    "properties.alerts",
                    f"is empty while additionalData.alertsCount is {incident.alerts_count}",
                )
            ],
            extra={
                **about,
                "alertsCount": incident.alerts_count,
                "providerIncidentUrl": incident.provider_incident_url,
            },
        )
    assert plan.body is not None  # an Update plan always has a body
    update = validate_batch_update(
        plan.body, ValidationRules(settings.alert_id_pattern, settings.max_alerts_per_request)
    )
    rt = await runtime.ready()
    submission = Submission(
        update=update,
        source="sentinel",
        caller=caller,
        operations_url=operations_base,
        location_query=location_query,
        explicit_key=plan.idempotency_key,
        respond_async=respond_async,
        extra=about,
    )
    services: TenantServices = rt.tenant(tenant)
    return await services.intake.submit(submission)
