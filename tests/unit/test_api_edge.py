"""The HTTP edge's translation of outcomes and errors: what a caller sees, without a host or storage."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest

from shared.api import guarded, render
from shared.errors import (
    AlertgateError,
    FieldError,
    LedgerConflict,
    LimiterContentionError,
    StateContention,
    StorageUnavailable,
)
from shared.http import ApiRequest, ApiResponse, json_response
from shared.outcomes import Accepted, InProgress, KeyReused, NothingToDo, Refused, Replayed

REQUEST = ApiRequest("POST", "http://127.0.0.1/api/alerts/batchUpdate", {})


def raising(exc: Exception) -> Callable[[ApiRequest], Awaitable[ApiResponse]]:
    async def handler(_request: ApiRequest) -> ApiResponse:
        raise exc

    return handler


@pytest.mark.parametrize(
    "exc",
    [
        LedgerConflict("the accept counter kept moving"),
        LimiterContentionError("the budget row kept changing"),
        StateContention("a row kept changing", retry_after=2.5),
    ],
)
async def test_contention_on_state_is_a_503_with_retry_after(exc: StateContention) -> None:
    answer = await guarded(raising(exc), REQUEST)
    document = json.loads(answer.body)
    assert answer.status == 503
    assert int(answer.headers["Retry-After"]) >= max(1, int(exc.retry_after))
    assert document["type"].endswith("state-contention") and document["status"] == 503


async def test_storage_the_seam_gave_up_on_is_a_503_with_retry_after() -> None:
    answer = await guarded(raising(StorageUnavailable("read of k-1/key: reset", retry_after=2.0)), REQUEST)
    assert answer.status == 503 and "Retry-After" in answer.headers
    assert "Idempotency-Key" in json.loads(answer.body)["detail"]


async def test_anything_else_is_a_500_problem_naming_an_incident_never_bare() -> None:
    answer = await guarded(raising(RuntimeError("bug")), REQUEST)
    document = json.loads(answer.body)
    assert answer.status == 500 and answer.headers["Content-Type"].startswith("application/problem+json")
    assert document["incident"] in document["detail"]


def test_the_hierarchy_has_one_root() -> None:
    for kind in (LedgerConflict, LimiterContentionError, StateContention, StorageUnavailable):
        assert issubclass(kind, AlertgateError)
    assert issubclass(LedgerConflict, StateContention) and issubclass(LimiterContentionError, StateContention)


def test_each_outcome_renders_as_the_contract_says() -> None:
    first = json_response(200, {"operationId": "op-1", "status": "Succeeded"})
    assert render(Accepted("op-1", first)) is first
    assert render(Replayed("op-1", first)) is first

    busy = render(InProgress("op-2", 6))
    assert busy.status == 409 and busy.headers["Retry-After"] == "6"
    assert json.loads(busy.body)["operationId"] == "op-2"

    reused = render(KeyReused("explicit"))
    document = json.loads(reused.body)
    assert reused.status == 422 and document["errors"][0]["field"] == "Idempotency-Key"

    refused = render(
        Refused(422, "alerts-not-in-payload", "t", "d", [FieldError("properties.alerts", "empty")])
    )
    assert refused.status == 422 and json.loads(refused.body)["errors"] == [
        {"field": "properties.alerts", "message": "empty"}
    ]

    nothing = render(NothingToDo({"status": "NoDefenderAlerts"}))
    assert nothing.status == 200 and json.loads(nothing.body)["status"] == "NoDefenderAlerts"
