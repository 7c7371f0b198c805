"""A small FunctionApp that exercises the development host (used only by tests/devhost).

Settings (environment): AzureWebJobsStorage, SAMPLE_QUEUE (queue name), SAMPLE_TABLE (where queue,
timer and shutdown runs are recorded, so tests read them back from Azurite), SAMPLE_TICK_SCHEDULE.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import azure.functions as func
from azure.core.exceptions import ResourceExistsError
from azure.data.tables.aio import TableClient

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

_table: TableClient | None = None


async def _records() -> TableClient:
    """One table client for the process, created on the host's event loop on first use."""
    global _table
    if _table is None:
        connection = os.environ["AzureWebJobsStorage"]  # noqa: SIM112 - the host's own setting name
        client = TableClient.from_connection_string(connection, os.environ["SAMPLE_TABLE"])
        with contextlib.suppress(ResourceExistsError):
            await client.create_table()
        _table = client
    return _table


async def record(kind: str, row: str, **fields: Any) -> None:
    table = await _records()
    await table.upsert_entity({"PartitionKey": kind, "RowKey": row, **fields})


def _json(data: object, status: int = 200) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(data), status_code=status, mimetype="application/json")


@app.route(route="echo/{name}/{item?}", methods=["GET", "POST"])
async def echo(req: func.HttpRequest) -> func.HttpResponse:
    body = req.get_body()
    return _json(
        {
            "method": req.method,
            "url": req.url,
            "route": dict(req.route_params),
            "params": dict(req.params),
            "json": json.loads(body) if body else None,
            "header": req.headers.get("x-sample"),
            "thread": threading.current_thread().name,
        }
    )


@app.route(route="sync/{number:int}", methods=["GET"])
def sync_echo(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    return _json(
        {
            "number": req.route_params["number"],
            "thread": threading.current_thread().name,
            "function": context.function_name,
            "invocation": context.invocation_id,
        }
    )


@app.route(route="custom", methods=["GET"])
def custom(req: func.HttpRequest) -> func.HttpResponse:
    response = func.HttpResponse(
        "caf\u00e9", status_code=418, headers={"X-Sample": "one"}, mimetype="text/html", charset="latin-1"
    )
    response.headers.add("Set-Cookie", "a=1")
    response.headers.add("Set-Cookie", "b=2")
    return response


@app.route(route="boom")
async def boom(req: func.HttpRequest) -> func.HttpResponse:
    raise RuntimeError("the sample function failed on purpose")


@app.route(route="size", methods=["POST"])
async def size(req: func.HttpRequest) -> func.HttpResponse:
    body = req.get_body()
    return _json({"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()})


@app.route(route="slow", methods=["GET"])
async def slow(req: func.HttpRequest) -> func.HttpResponse:
    await asyncio.sleep(float(req.params.get("seconds", "1")))
    return func.HttpResponse("done")


@app.route(route="with-output", methods=["GET"])
@app.queue_output(arg_name="out", queue_name="sample-unused", connection="AzureWebJobsStorage")
def with_output(req: func.HttpRequest, out: func.Out[str] | None = None) -> str:
    """Declares an output binding devhost does not support: the host warns and still serves it."""
    return "plain text"


@app.queue_trigger(arg_name="msg", queue_name="%SAMPLE_QUEUE%", connection="AzureWebJobsStorage")
async def work(msg: func.QueueMessage) -> None:
    """Records every delivery; a body of `fail` raises, `sleep:<s>` holds the message that long."""
    text = msg.get_body().decode("utf-8")
    started = datetime.now(UTC)
    if text.startswith("sleep:"):
        await asyncio.sleep(float(text.removeprefix("sleep:")))
    await record(
        "queue",
        f"{msg.id}-{msg.dequeue_count}",
        message_id=str(msg.id),
        body=text,
        dequeue_count=int(msg.dequeue_count or 0),
        inserted=msg.insertion_time.isoformat() if msg.insertion_time else "",
        started=started.isoformat(),
        finished=datetime.now(UTC).isoformat(),
    )
    if text == "fail":
        raise ValueError("asked to fail")


@app.timer_trigger(arg_name="timer", schedule="0 0 0 1 1 *", run_on_startup=True)
async def startup_timer(timer: func.TimerRequest) -> None:
    await record("timer", f"startup-{uuid.uuid4()}", past_due=timer.past_due)


@app.timer_trigger(arg_name="timer", schedule="%SAMPLE_TICK_SCHEDULE%")
async def tick(timer: func.TimerRequest) -> None:
    await record("tick", datetime.now(UTC).strftime("%H%M%S.%f"))


async def shutdown() -> None:
    """The host's shutdown convention: record that it ran, then close the client."""
    global _table
    await record("shutdown", str(os.getpid()), at=datetime.now(UTC).isoformat())
    if _table is not None:
        await _table.close()
        _table = None
