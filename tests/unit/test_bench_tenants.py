"""bench.tenants' pure helpers: the fault script, the per-tenant tally of the emulator's call records, and
the tid check. No services."""

from __future__ import annotations

from typing import Any

from bench.common import alert_id
from bench.tenants import (
    TENANT_A,
    TENANT_B,
    fault_script,
    listed,
    offsets,
    tally,
    tid_mismatches,
)
from emulators.mde import parse_fault
from shared.settings import parse_rate_limits

A, B = TENANT_A.tenant_id, TENANT_B.tenant_id


def call(
    time: float, tenant: str | None, alerts: list[str], status: int = 200, *, fault: bool = False
) -> dict[str, Any]:
    return {
        "time": time,
        "tenantId": tenant,
        "alertIds": alerts,
        "status": status,
        "admitted": status != 429 or fault,
        "fault": {"status": 429} if fault else None,
    }


def test_offsets_are_even_and_start_at_zero() -> None:
    assert offsets(4, 1.0) == [0.0, 0.25, 0.5, 0.75]


def test_the_fault_script_passes_calls_then_answers_429_for_one_tenant_only() -> None:
    script = fault_script(A, 3, 3)
    assert [f.get("status") for f in script] == [None, None, None, 429]
    assert {f["tenantId"] for f in script} == {A}
    assert script[-1]["retryAfter"] == 3
    faults = [parse_fault(f) for f in script]  # the emulator accepts every entry
    assert [f.meant_for("batchUpdate", A) for f in faults] == [True] * 4
    assert not any(f.meant_for("batchUpdate", B) for f in faults)
    assert all(f.delay_seconds == 0 and f.apply for f in faults[:3])


def test_tally_counts_a_tenants_calls_applied_lost_twice_and_its_drain() -> None:
    mine = [alert_id(1), alert_id(2), alert_id(3)]
    calls = [
        call(10.5, A, [mine[0]]),
        call(10.6, B, [alert_id(9)]),  # another tenant's: not counted
        call(11.0, A, [mine[1]], 429, fault=True),
        call(11.1, A, [mine[1]], 429),  # the limiter's: not admitted
        call(14.5, A, [mine[1]]),
        call(15.0, A, [mine[1]]),  # applied again
        call(15.5, A, [mine[2]], 503),
    ]
    windows = parse_rate_limits("2/2,10/20")
    figures = tally(calls, A, mine, 10.0, windows, block_seconds=3.0)
    assert (figures.calls, figures.ok, figures.scripted_429, figures.limiter_429, figures.other) == (
        6,
        3,
        1,
        1,
        1,
    )
    assert (figures.applied, figures.lost, figures.twice) == (2, 1, 1)
    assert figures.drain is None  # mine[2] never applied
    assert figures.first_call == 0.5
    assert figures.block_at == 1.0
    assert [round(t, 3) for t in figures.in_block] == [0.1]  # the limiter's 429 at 11.1
    assert figures.resumed == 4.5
    assert figures.busiest == (3, 5)  # admitted: 10.5, 11.0, 14.5, 15.0, 15.5


def test_the_drain_is_the_first_application_of_the_last_applied_update() -> None:
    mine = [alert_id(1), alert_id(2)]
    calls = [call(1.0, B, [mine[0]]), call(3.0, B, [mine[1]]), call(4.0, B, [mine[1]])]
    figures = tally(calls, B, mine, 0.0, parse_rate_limits("5/2"))
    assert figures.drain == 3.0 and figures.twice == 1


def test_a_call_naming_a_tenants_alert_with_another_tenants_token_is_a_mismatch() -> None:
    owner = {alert_id(1): A, alert_id(2): B}
    calls = [
        call(0.0, A, [alert_id(1)]),
        call(0.1, B, [alert_id(1)]),  # A's alert, B's token
        call(0.2, None, [alert_id(2)], 401),  # no valid token
        call(0.3, B, [alert_id(7)]),  # an alert nobody sent: not counted
    ]
    assert tid_mismatches(calls, owner) == 2


def test_listed_shows_every_run_and_the_median_of_those_known() -> None:
    assert listed([6.5, None, 7.0]) == "6.50, never, 7.00 (median 6.75 s)"
    assert listed([None]) == "never"
