"""How each MDE answer is classified (docs/mde-api.md §2), and the learned batch limit."""

from __future__ import annotations

import json

import pytest

from shared.channels.base import CallKind, parse_retry_after
from shared.channels.batch_update import BatchLimit
from shared.channels.batch_update import classify_batch_update as classify


def error(code: str, message: str = "m", target: str = "t-1") -> str:
    return json.dumps({"error": {"code": code, "message": message, "target": target}})


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (200, "", CallKind.OK),
        (400, error("InvalidRequestBody"), CallKind.PERMANENT),
        (401, error("Unauthorized"), CallKind.UNAUTHORIZED),
        (403, error("Forbidden"), CallKind.FORBIDDEN),
        (404, error("NotFound"), CallKind.PERMANENT),
        (409, error("Conflict"), CallKind.PERMANENT),
        (429, error("TooManyRequests"), CallKind.RETRYABLE),
        (500, error("InternalServerError"), CallKind.RETRYABLE),
        (502, "<html>bad gateway</html>", CallKind.RETRYABLE),
        (503, "", CallKind.RETRYABLE),
        (504, "", CallKind.RETRYABLE),
    ],
)
def test_kinds(status: int, body: str, kind: CallKind) -> None:
    assert classify(status, None, body).kind is kind


def test_error_body_fields_are_kept() -> None:
    result = classify(404, None, error("NotFound", "Alert da1 not found", "corr-9"))
    assert result.error is not None
    assert (result.error.http_status, result.error.code, result.error.message, result.error.target) == (
        404,
        "NotFound",
        "Alert da1 not found",
        "corr-9",
    )


def test_non_json_error_body_is_kept_short() -> None:
    result = classify(500, None, "x" * 5000)
    assert result.error is not None and result.error.code is None and len(result.error.message) == 500


def test_maximum_batch_size_reports_the_allowance() -> None:
    result = classify(
        400, None, error("MaximumBatchSizeExceeded", "Maximum batch size exceeded. Received: 9, allowed: 4")
    )
    assert result.kind is CallKind.BATCH_TOO_LARGE and result.allowed_batch_size == 4


def test_retry_after_seconds_and_dates() -> None:
    assert classify(429, "7", "").retry_after == 7
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0
    assert parse_retry_after("soon") is None


async def test_batch_limit_learns_and_never_grows() -> None:
    limit = BatchLimit(500)  # no table: this process only
    assert await limit.learn(100, 500) == 100 and limit.current == 100
    assert await limit.learn(None, 100) == 50  # MDE gave no number: halve
    assert await limit.learn(400, 50) == 49  # never back up, and always below what was refused
    assert BatchLimit(3).current == 3
