"""The figures of docs/telemetry.md after a run against the real parts: Azurite's tables and queues, the
MDE emulator's own 429 and 403 answers (read by the real channel), a token from the real
ManagedIdentityCredential. The runtime is built in this process, as the Functions worker builds it, with
the OpenTelemetry SDK's in-memory reader and exporter as its providers; nothing of alertgate is patched.
(The environment variables azure-identity reads are set for the test, as the worker's environment sets
them.)"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from devhost.services import Service, local_app_env
from emulators.control import EmulatorControl
from shared.intake import Submission
from shared.outcomes import Accepted
from shared.queue_handlers import snapshot
from shared.runtime import Runtime, build_runtime
from shared.settings import load_settings
from shared.validation import ValidationRules, validate_batch_update
from tests.conftest import isolated_settings
from tests.integration.helpers import new_ids
from tests.otel import Otel, attrs

RETRY_AFTER = 2


@pytest.fixture
async def running(
    azurite: Service, emulators: Service, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Runtime, Otel]]:
    env = local_app_env(
        connection_string=azurite.urls["connection_string"],
        mde_url=emulators.urls["mde"],
        identity_url=emulators.urls["identity"],
        identity_header=emulators.urls["identity_header"],
        # a window long enough that the snapshot still sees the test's calls on a busy machine
        overrides={
            **isolated_settings("otel"),
            "SYNC_MAX_WAIT_SECONDS": "0.2",
            "DEFENDER_RATE_LIMITS": "2000/600",
        },
    )
    for name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER"):  # what ManagedIdentityCredential reads
        monkeypatch.setenv(name, env[name])
    figures = Otel()
    runtime = await build_runtime(load_settings(env), figures.telemetry)
    try:
        await runtime.ensure_storage()
        yield runtime, figures
    finally:
        await runtime.close()
        figures.shutdown()


async def submit(runtime: Runtime, alert: str, status: str) -> str:
    rules = ValidationRules(runtime.settings.alert_id_pattern, runtime.settings.max_alerts_per_request)
    update = validate_batch_update({"alertIds": [alert], "status": status}, rules)
    outcome = await runtime.home.intake.submit(
        Submission(update=update, source="http", caller={"authentication": "functionKey"}, operations_url="/")
    )
    assert isinstance(outcome, Accepted), outcome
    return outcome.operation_id


async def test_a_run_with_a_403_a_429_and_a_poison_message_gives_exact_figures(
    running: tuple[Runtime, Otel], ctl: EmulatorControl
) -> None:
    runtime, figures = running
    home = runtime.home
    await ctl.add_faults([{"status": 403}, {"status": 429, "retryAfter": RETRY_AFTER}])
    a, b, c = new_ids(3)

    refused = await submit(runtime, a, "Resolved")  # 403: Failed at once
    blocked = await submit(runtime, b, "InProgress")  # 429: deferred, the budget blocked
    poisoned = await submit(runtime, c, "New")  # deferred behind the block, never sent
    [chunk_c] = await home.ledger.chunks_of(await _operation(runtime, poisoned))
    assert await home.worker.on_poison(chunk_c.chunk_id)  # its message reached the poison queue
    await asyncio.sleep(RETRY_AFTER + 0.5)
    [chunk_b] = await home.ledger.chunks_of(await _operation(runtime, blocked))
    assert await home.worker.on_message(chunk_b.chunk_id, chunk_b.msg_token) == "finished"  # 200
    assert home.watcher is not None
    await home.watcher.drain()

    assert [call["status"] for call in await ctl.calls()] == [403, 429, 200]
    assert figures.named("alertgate.mde.calls") == {
        attrs(tenant="home", channel="batchUpdate", outcome="4xx", error_code="Forbidden"): 1,
        attrs(tenant="home", channel="batchUpdate", outcome="429", error_code="TooManyRequests"): 1,
        attrs(tenant="home", channel="batchUpdate", outcome="200", error_code="none"): 1,
    }
    assert figures.named("alertgate.mde.forbidden") == {attrs(tenant="home", channel="batchUpdate"): 1}
    assert figures.named("alertgate.mde.call.members") == {
        attrs(tenant="home", channel="batchUpdate"): (3, 3)
    }
    assert figures.named("alertgate.chunks.ended") == {
        attrs(tenant="home", channel="batchUpdate", result="Failed"): 1,
        attrs(tenant="home", channel="batchUpdate", result="Succeeded"): 1,
        attrs(tenant="home", channel="none", result="Failed"): 1,
    }
    assert figures.named("alertgate.poison.messages") == {attrs(tenant="home", queue="chunks"): 1}
    events = {str(e["operationId"]): e for e in figures.events()}
    assert {k: (e["status"], e["errorCode"]) for k, e in events.items()} == {
        refused: ("Failed", "Forbidden"),
        blocked: ("Succeeded", "none"),
        poisoned: ("Failed", "PoisonMessage"),
    }
    assert json.loads(events[blocked]["chunkResults"]) == {"Succeeded": 1}


async def test_the_snapshot_gauges_read_budget_backlog_and_queues(
    running: tuple[Runtime, Otel], ctl: EmulatorControl
) -> None:
    runtime, figures = running
    await ctl.add_faults([{"status": 429, "retryAfter": 30}])
    await submit(runtime, new_ids(1)[0], "Resolved")  # 429: stays pending, its message queued

    backlog = await snapshot(runtime, time.time())

    assert backlog == {"home": 1}
    assert figures.named("alertgate.backlog.pending") == {attrs(tenant="home"): 1}
    [age] = figures.named("alertgate.backlog.oldest_age").values()
    assert 0 <= age < 30
    used = figures.named("alertgate.budget.used")
    assert used == {attrs(tenant="home", channel="batchUpdate", window="600", limit=2000): 1}
    depths = figures.named("alertgate.queue.depth")
    assert depths[attrs(queue=runtime.settings.chunks_queue)] == 1
    assert depths[attrs(queue=f"{runtime.settings.requests_queue}-poison")] == 0


async def _operation(runtime: Runtime, operation_id: str) -> Any:
    operation = await runtime.home.ledger.operation(operation_id)
    assert operation is not None
    return operation
