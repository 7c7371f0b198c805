"""Fixtures shared by the unit tests over fakes (sender, worker, intake)."""

from __future__ import annotations

import pytest

from tests.unit.upstream_fakes import ManualClock, install_virtual_sleep


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    """A manual clock that asyncio.sleep advances instead of waiting (see install_virtual_sleep)."""
    clock = ManualClock()
    install_virtual_sleep(monkeypatch, clock)
    return clock
