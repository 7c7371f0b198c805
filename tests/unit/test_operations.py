"""Operation status rules, chunk planning and back-off, without storage."""

from __future__ import annotations

from dataclasses import replace

import pytest

from shared.ledger import Chunk, ChunkResult, ChunkState, Operation, PendingState, fingerprints
from shared.operations import is_operation_id, retry_after_seconds, status_of
from shared.sender import backoff, plan_chunks

OP = Operation("3f1c0e52-5d7a-4f8e-9a57-2f1f3c9b7e10", 1000.0, "http", {}, 3, 1, 3)


def chunk(n: int, state: ChunkState, attempts: int = 1, answer: int = 0) -> Chunk:
    return Chunk(
        f"{n:012d}",
        OP.operation_id,
        (f"a{n}",),
        {"status": "New"},
        1000.0,
        state=state,
        attempts=attempts,
        answer_status=answer,
    )


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([(PendingState.PENDING, 0, 0)] * 2, ("Queued", 202, False)),
        ([(ChunkResult.SUCCEEDED, 1, 200), (PendingState.PENDING, 0, 0)], ("Running", 202, False)),
        ([(PendingState.SENDING, 1, 0)], ("Running", 202, False)),
        ([(ChunkResult.SUCCEEDED, 1, 200)] * 3, ("Succeeded", 200, True)),
        ([(ChunkResult.SUCCEEDED, 1, 200), (ChunkResult.FAILED, 1, 422)], ("PartiallySucceeded", 422, True)),
        (
            [
                (ChunkResult.FAILED, 1, 422),
                (ChunkResult.OUTCOME_UNKNOWN, 1, 504),
                (ChunkResult.FAILED, 1, 502),
            ],
            ("Failed", 504, True),
        ),
        ([(ChunkResult.FAILED, 1, 422), (ChunkResult.FAILED, 3, 502)], ("Failed", 502, True)),
    ],
)
def test_status_rules(states: list[tuple[ChunkState, int, int]], expected: tuple[str, int, bool]) -> None:
    chunks = [chunk(i, s, a, h) for i, (s, a, h) in enumerate(states)]
    state = status_of(replace(OP, first_seq=0, last_seq=len(chunks) - 1), chunks)
    assert (state.status, state.http_status, state.terminal) == expected


def test_an_invalid_request_is_failed_with_its_status() -> None:
    invalid = Operation("x", 0.0, "queue", {}, 0, 0, -1, [{"field": "status", "message": "m"}], 400)
    state = status_of(invalid, [])
    assert (state.status, state.http_status, state.terminal) == ("Failed", 400, True)


def test_plan_chunks_by_limit_and_by_transaction_size() -> None:
    ids = tuple(f"a{i}" for i in range(10))
    assert [len(c) for c, _ in plan_chunks(ids, {"status": "New"}, 4, 97)] == [4, 4, 2]
    assert [len(c) for c, _ in plan_chunks(ids, {"status": "New"}, 1, 3)] == [4, 4, 2]


def test_backoff_grows_is_capped_and_honours_retry_after() -> None:
    assert 0.5 <= backoff(1, None) <= 1.5
    assert 4 <= backoff(4, None) <= 12
    assert backoff(30, None) <= 450
    assert backoff(1, 9.0) >= 9.0


def test_retry_after_is_between_1_and_60() -> None:
    due = chunk(1, PendingState.PENDING)
    due.not_before = 1010.4
    assert retry_after_seconds([due], now=1000.0) == 11
    due.not_before = 5000.0
    assert retry_after_seconds([due], now=1000.0) == 60
    assert retry_after_seconds([], now=1000.0) == 1


def test_fingerprints_are_order_free_and_distinct() -> None:
    assert fingerprints(["b", "a", "a"]) == fingerprints(["a", "b"])
    assert len(fingerprints(["a", "b"])) == 8 and fingerprints(["a"]) != fingerprints(["b"])


def test_operation_ids_are_canonical_uuids() -> None:
    assert is_operation_id("3f1c0e52-5d7a-4f8e-9a57-2f1f3c9b7e10")
    assert not is_operation_id("3F1C0E52-5D7A-4F8E-9A57-2F1F3C9B7E10x")
    assert not is_operation_id("../../etc")


def test_a_chunk_missing_from_a_read_keeps_the_operation_running() -> None:
    """Chunk 1 finished between the reads of pending and finished chunks and was seen in neither."""
    op = replace(OP, first_seq=0, last_seq=1)
    state = status_of(op, [chunk(0, ChunkResult.SUCCEEDED, 1, 200)])
    assert (state.status, state.http_status, state.terminal) == ("Running", 202, False)
