"""Fixtures for end-to-end tests: an HTTP client and a freshly reset emulator per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from azure.data.tables.aio import TableServiceClient

from devhost.services import Service
from emulators.control import EmulatorControl
from shared.storage import Tables


@pytest.fixture
async def ctl(emulators: Service) -> AsyncIterator[EmulatorControl]:
    async with EmulatorControl(emulators.urls["mde"], emulators.urls["identity_base"]) as control:
        await control.reset()
        await control.identity_reset()
        yield control


@pytest.fixture
def own_hosts() -> Iterator[list[Service]]:
    """Hosts a test started for itself; stopped when it ends, so they do not keep polling and sweeping
    (and calling the shared emulator) during later tests."""
    started: list[Service] = []
    yield started
    for host in started:
        host.stop()


@pytest.fixture
async def tables(azurite: Service) -> AsyncIterator[Tables]:
    """alertgate's tables under a prefix of the test's own, for tests that use shared/ directly."""
    service = TableServiceClient.from_connection_string(azurite.urls["connection_string"])
    tables = Tables.from_service(service, f"p{uuid.uuid4().hex[:10]}")
    await tables.ensure_exist(service)
    yield tables
    await tables.close()
    await service.close()
