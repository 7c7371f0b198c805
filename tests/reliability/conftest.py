"""Fixtures of the reliability suite, and the switch between its fast subset and the whole suite.

The README's test command runs `pytest` over `tests/`, so this suite's fast subset runs there on every
change; the cases marked `full` (the rest of the fault matrix, the Azurite restart, ten thousand
generated bodies) would add minutes, so they are *deselected* unless `ALERTGATE_FULL=1` — deselected
rather than skipped, so the default run's summary does not fill with skips that are not failures of
anything. `scripts/reliability.sh` sets the variable and runs the whole suite.

The session's Azurite and emulators (tests/conftest.py) serve most cases. A case that restarts Azurite
gets one of its own, on disk (`--location`) and on ports fixed for the test, so a restart comes back on
the same ports with the same data, as a storage account that was briefly unreachable would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from devhost.services import LOOPBACK, AzuritePorts, Service, free_port, local_app_env, start_azurite
from emulators.control import EmulatorControl
from tests.conftest import isolated_settings

FULL_ENV = "ALERTGATE_FULL"


def full_suite() -> bool:
    """True when the whole reliability suite runs (`scripts/reliability.sh` sets ALERTGATE_FULL=1)."""
    return os.environ.get(FULL_ENV, "") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the `full` cases unless ALERTGATE_FULL=1 (see the module docstring for why deselect)."""
    if full_suite():
        return
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        (drop if item.get_closest_marker("full") is not None else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
async def ctl(emulators: Service) -> AsyncIterator[EmulatorControl]:
    """The session's emulators, reset: no calls, faults, alerts or windows from earlier tests."""
    async with EmulatorControl(emulators.urls["mde"], emulators.urls["identity_base"]) as control:
        await control.reset()
        yield control
        await control.reset()  # leave no scripted fault or tight limit behind for the next test


@pytest.fixture
def own_hosts() -> Iterator[list[Service]]:
    """Hosts a case started for itself (killed and replaced ones included); stopped when it ends, all
    signalled first so their graceful stops overlap, so none keeps polling or sweeping into later cases."""
    started: list[Service] = []
    yield started
    alive = [host for host in started if host.alive()]
    for host in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(host.proc.pid, signal.SIGTERM)
    for host in alive:
        host.stop()


@dataclass
class DiskAzurite:
    """An Azurite of one test, its data on disk, that the test may stop and start again.

    The ports are chosen once, so every start listens where the app's connection string points.
    """

    log_dir: Path
    location: Path
    ports: AzuritePorts
    service: Service | None = None
    starts: int = field(default=0)

    def start(self) -> Service:
        """Start (again) on the same ports with the same data; blocks until both services listen."""
        self.starts += 1
        self.service = start_azurite(
            self.log_dir / f"azurite-{self.starts}", ports=self.ports, location=self.location
        )
        return self.service

    def stop(self) -> int | None:
        """A graceful stop (SIGTERM, as `Service.stop` sends): Azurite writes its data out and exits."""
        if self.service is None:
            return None
        return self.service.stop()

    @property
    def connection_string(self) -> str:
        assert self.service is not None, "start() first"
        return self.service.urls["connection_string"]


@pytest.fixture
def disk_azurite(tmp_path: Path) -> Iterator[DiskAzurite]:
    """A started DiskAzurite in the test's own directory; stopped at the end whatever state it is in."""
    azurite = DiskAzurite(
        tmp_path / "logs", tmp_path / "azurite-data", AzuritePorts(free_port(), free_port())
    )
    azurite.start()
    yield azurite
    azurite.stop()


def app_env(connection_string: str, emulators: Service, **overrides: str) -> dict[str, str]:
    """The environment of a host of the app against this storage and these emulators, with tables and
    queues of its own (as tests/conftest.py's HostPool gives, for cases that bring their own Azurite or
    emulators) and a budget that does not get in the way unless the case sets one."""
    isolated = {
        **isolated_settings("r"),
        "AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:00.500",
    }
    return local_app_env(
        connection_string=connection_string,
        mde_url=emulators.urls["mde"],
        identity_url=emulators.urls["identity"],
        identity_header=emulators.urls["identity_header"],
        overrides={**isolated, **overrides},
    )


class SlowQueryProxy:
    """A loopback HTTP proxy in front of Azurite's Table endpoint that holds back chosen range queries.

    A storage read that is slow while a write goes through is ordinary in production (a busy partition
    server, a retry after a dropped connection); here it is made exact, so an interleaving of a reader's
    two queries with a writer's transaction happens every time instead of once in thousands of polls.
    Requests whose `$filter` contains `hold` wait `delay` seconds before they are forwarded; everything
    else passes at once. `async with SlowQueryProxy(...) as proxy` serves on `proxy.url`.
    """

    def __init__(self, target: str, hold: str, delay: float) -> None:
        self.target = target.rstrip("/")
        self.hold = hold
        self.delay = delay
        self.held = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SlowQueryProxy:
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, LOOPBACK, port).start()
        self.url = f"http://{LOOPBACK}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._client is not None
        if self.hold in request.query.get("$filter", ""):
            self.held += 1
            await asyncio.sleep(self.delay)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        data = await request.read() or None  # no body: no Content-Type added (it is signed)
        async with self._client.request(
            request.method, self.target + request.path_qs, headers=headers, data=data
        ) as upstream:
            body = await upstream.read()
            kept = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
            return web.Response(status=upstream.status, headers=kept, body=body)


_HOP_BY_HOP = frozenset(
    {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade"}
)
