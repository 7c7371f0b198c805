"""alertgate's Azure Functions entry point: bindings and HTTP/queue translation only.

Everything else lives in `shared/` as plain async Python (shared/api.py, shared/queue_handlers.py). Settings
are read and validated here at import, so a misconfigured app stops at start-up with a message naming
each bad setting; queue names and the sweep schedule come from them too.
"""

from __future__ import annotations

import logging

import azure.functions as func

from shared import api, queue_handlers, runtime
from shared.http import ApiRequest, ApiResponse

SETTINGS = runtime.settings()  # fail fast: raises SettingsError naming every invalid setting
log = logging.getLogger("alertgate")

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


def _request(req: func.HttpRequest) -> ApiRequest:
    return ApiRequest(
        method=req.method,
        url=req.url,
        headers=dict(req.headers),
        body=req.get_body(),
        query=dict(req.params),
        route_params=dict(req.route_params),
    )


def _response(res: ApiResponse) -> func.HttpResponse:
    return func.HttpResponse(body=res.body, status_code=res.status, headers=res.headers)


@app.route(route="alerts/batchUpdate", methods=["POST"])
async def batch_update(req: func.HttpRequest) -> func.HttpResponse:
    return _response(await api.guarded(api.batch_update, _request(req)))


@app.route(route="sentinel/incidents", methods=["POST"])
async def sentinel_incident(req: func.HttpRequest) -> func.HttpResponse:
    return _response(await api.guarded(api.sentinel_incident, _request(req)))


@app.route(route="tenants/{tenant}/alerts/batchUpdate", methods=["POST"])
async def tenant_batch_update(req: func.HttpRequest) -> func.HttpResponse:
    return _response(await api.guarded(api.batch_update, _request(req)))


@app.route(route="tenants/{tenant}/sentinel/incidents", methods=["POST"])
async def tenant_sentinel_incident(req: func.HttpRequest) -> func.HttpResponse:
    return _response(await api.guarded(api.sentinel_incident, _request(req)))


@app.route(route="operations/{operationId}", methods=["GET"])
async def get_operation(req: func.HttpRequest) -> func.HttpResponse:
    return _response(await api.guarded(api.get_operation, _request(req)))


@app.route(route="health", methods=["GET"])
async def health(req: func.HttpRequest) -> func.HttpResponse:
    return _response(await api.guarded(api.health, _request(req)))


@app.queue_trigger(arg_name="msg", queue_name=SETTINGS.requests_queue, connection="AzureWebJobsStorage")
async def inbound_request(msg: func.QueueMessage) -> None:
    outcome = await queue_handlers.handle_request_message(
        msg.id or "", msg.get_body(), msg.dequeue_count or 1
    )
    log.info("inbound message %s: %s", msg.id, outcome)


@app.queue_trigger(
    arg_name="msg", queue_name=f"{SETTINGS.requests_queue}-poison", connection="AzureWebJobsStorage"
)
async def inbound_request_poison(msg: func.QueueMessage) -> None:
    log.warning(
        "inbound poison message %s: %s",
        msg.id,
        await queue_handlers.handle_request_poison(msg.id or "", msg.get_body()),
    )


@app.queue_trigger(arg_name="msg", queue_name=SETTINGS.chunks_queue, connection="AzureWebJobsStorage")
async def send_chunk(msg: func.QueueMessage) -> None:
    outcome = await queue_handlers.handle_chunk_message(msg.get_body())
    log.info("chunk message %s: %s", msg.id, outcome)


@app.queue_trigger(
    arg_name="msg", queue_name=f"{SETTINGS.chunks_queue}-poison", connection="AzureWebJobsStorage"
)
async def chunk_poison(msg: func.QueueMessage) -> None:
    log.warning(
        "chunk poison message %s: %s", msg.id, await queue_handlers.handle_chunk_poison(msg.get_body())
    )


@app.timer_trigger(arg_name="timer", schedule=SETTINGS.sweep_schedule, run_on_startup=False)
async def sweep(timer: func.TimerRequest) -> None:
    counts = await queue_handlers.run_sweep()
    if counts["staleSends"] or counts["requeued"]:
        log.warning("sweep resolved %s", counts)
    elif counts["settled"]:
        log.info("sweep settled %d chunks finished on the synchronous path", counts["settled"])


@app.timer_trigger(arg_name="timer", schedule="0 17 3 * * *", run_on_startup=False)
async def purge(timer: func.TimerRequest) -> None:
    """Daily: expired idempotency keys, operations, results and journal entries."""
    import time

    keys, records = await queue_handlers.run_purge(time.time())
    log.info("purge removed %d keys and %d ledger records", keys, records)


@app.timer_trigger(arg_name="timer", schedule="0 * * * * *", run_on_startup=False)
async def telemetry_snapshot(timer: func.TimerRequest) -> None:
    """Every minute: the budget, backlog and queue-depth gauges (docs/telemetry.md)."""
    import time

    backlog = await queue_handlers.run_telemetry_snapshot(time.time())
    log.debug("telemetry snapshot: backlog %s", backlog)


async def shutdown() -> None:
    """Close the worker's aiohttp session and credentials (called by the development host on exit)."""
    await runtime.shutdown()
