"""Timer triggers in a real devhost process: run_on_startup, and a schedule that fires every second."""

from __future__ import annotations

from azure.data.tables.aio import TableClient

from tests.devhost.conftest import eventually, rows

HOST_SETTINGS = {"SAMPLE_TICK_SCHEDULE": "*/1 * * * * *"}


async def test_run_on_startup_fires_once_with_a_timer_request(records: TableClient) -> None:
    started = await eventually(lambda: rows(records, "timer"), bool, within=5)
    assert len(started) == 1  # the yearly schedule itself is not due
    assert started[0]["past_due"] is False


async def test_schedule_fires_every_second_without_double_firing(records: TableClient) -> None:
    ticks = await eventually(lambda: rows(records, "tick"), lambda r: len(r) >= 3, within=6)
    seconds = [row["RowKey"].split(".")[0] for row in ticks]  # HHMMSS of each run
    assert len(seconds) == len(set(seconds)), f"an occurrence fired twice: {sorted(seconds)}"
