"""A development host serving tests/devhost/sample_app.py against the session's Azurite, per test module.

Each module gets its own queue and table names, so modules never see each other's messages or records.
A module may define HOST_SETTINGS (extra environment, e.g. host.json overrides) for its host.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables.aio import TableClient

from devhost.services import Service, start_devhost

SAMPLE_APP = "tests.devhost.sample_app:app"
T = TypeVar("T")


@dataclass
class SampleHost:
    service: Service
    env: dict[str, str]

    @property
    def base(self) -> str:
        return self.service.urls["base"]

    @property
    def connection_string(self) -> str:
        return self.env["AzureWebJobsStorage"]

    @property
    def queue(self) -> str:
        return self.env["SAMPLE_QUEUE"]

    @property
    def table(self) -> str:
        return self.env["SAMPLE_TABLE"]

    def log(self) -> str:
        return self.service.log_path.read_text(errors="replace")


def sample_env(azurite: Service, tag: str, **extra: str) -> dict[str, str]:
    """The environment the sample app needs, with names unique to this call."""
    unique = uuid.uuid4().hex[:8]
    letters = "".join(c for c in tag.lower() if c.isalnum())
    env = dict(os.environ)
    env.update(
        {
            "AzureWebJobsStorage": azurite.urls["connection_string"],
            "SAMPLE_QUEUE": f"{letters[:40]}-{unique}",
            "SAMPLE_TABLE": f"t{letters[:40]}{unique}",
            "SAMPLE_TICK_SCHEDULE": "0 0 0 1 1 *",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def sample_host(request: pytest.FixtureRequest, log_dir: Path, azurite: Service) -> Iterator[SampleHost]:
    tag = request.module.__name__.rsplit(".", 1)[-1]
    env = sample_env(azurite, tag, **getattr(request.module, "HOST_SETTINGS", {}))
    service = start_devhost(log_dir, env, app=SAMPLE_APP, name=f"devhost-{tag}")
    yield SampleHost(service, env)
    service.stop()


@pytest.fixture
async def records(sample_host: SampleHost) -> AsyncIterator[TableClient]:
    """The sample app's record table (created here too, so reading never races its creation)."""
    client = TableClient.from_connection_string(sample_host.connection_string, sample_host.table)
    async with client:
        yield client


async def rows(table: TableClient, partition: str) -> list[dict[str, Any]]:
    try:
        return [dict(e) async for e in table.query_entities(f"PartitionKey eq '{partition}'")]
    except ResourceNotFoundError:  # the table appears only once the app first records something
        return []


async def eventually(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    within: float,
    interval: float = 0.1,
) -> T:
    """Probe until `done(value)`, for at most `within` seconds; fail with the last value seen."""
    deadline = time.monotonic() + within
    value = await probe()
    while not done(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s; last value: {value!r}")
        await asyncio.sleep(interval)
        value = await probe()
    return value
