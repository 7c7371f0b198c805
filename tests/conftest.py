"""Session-wide real services: Azurite and the emulators, started once on free loopback ports.

Tests that need the app start a development host with the settings they need (`devhost_factory`);
hosts are kept per distinct settings so that tests sharing a configuration share a process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import aiohttp
import pytest

from devhost.services import Service, local_app_env, start_azurite, start_devhost, start_emulators
from tests.openapi_answers import OpenApiViolation, spec_answers

_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Note whether a test's body failed, so that `http` reports a swallowed violation only then."""
    report: pytest.TestReport = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service-logs")


@pytest.fixture(scope="session")
def azurite(log_dir: Path) -> Iterator[Service]:
    service = start_azurite(log_dir)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def emulators(log_dir: Path) -> Iterator[Service]:
    service = start_emulators(log_dir)
    yield service
    service.stop()


def isolated_settings(prefix: str) -> dict[str, str]:
    """Tables and queues of a host's own (hosts share one Azurite), a budget that does not get in the way
    unless a test sets one, no PATCH channel and no derived keys unless a test wants them."""
    tag = f"{prefix}{uuid.uuid4().hex[:8]}"
    return {
        "TABLE_PREFIX": tag,
        "CHUNKS_QUEUE": f"chunks-{tag}",
        "REQUESTS_QUEUE": f"requests-{tag}",
        "DEFENDER_RATE_LIMITS": "2000/1",
        "RATE_LIMIT_SAFETY_MARGIN_SECONDS": "0",
        "DERIVED_KEY_TTL_SECONDS": "0",
        # The single-alert channel only where a test asks for it: elsewhere a spent or blocked batchUpdate
        # budget is what the test is about (tests/integration/test_throughput.py turns it on).
        "DEFENDER_PATCH_RATE_LIMITS": "off",
    }


class HostPool:
    """Development hosts of the real app, one per distinct set of setting overrides, kept for the session.

    Settings are read once per process (as in Azure), so a test that needs other settings gets its own
    host; tests that need the same settings share one.
    """

    def __init__(self, log_dir: Path, azurite: Service, emulators: Service) -> None:
        self._log_dir = log_dir
        self._azurite = azurite
        self._emulators = emulators
        self._hosts: dict[tuple[tuple[str, str], ...], Service] = {}
        self._others: list[Service] = []
        self._extra = 0

    def env(self, overrides: dict[str, str]) -> dict[str, str]:
        """Each host gets its own tables and queues (hosts share one Azurite), a budget that does not get
        in the way unless a test sets one, and no derived keys unless a test wants them."""
        isolated = {**isolated_settings("t"), "SYNC_MAX_WAIT_SECONDS": "2"}
        return local_app_env(
            connection_string=self._azurite.urls["connection_string"],
            mde_url=self._emulators.urls["mde"],
            identity_url=self._emulators.urls["identity"],
            identity_header=self._emulators.urls["identity_header"],
            overrides={**isolated, **overrides},
            authority_host=self._emulators.urls.get("entra"),
            ssl_cert_file=self._emulators.urls.get("entra_cert"),
        )

    def get(self, **overrides: str) -> Service:
        key = tuple(sorted(overrides.items()))
        host = self._hosts.get(key)
        if host is None or not host.alive():
            name = "devhost-" + ("-".join(f"{k}" for k, _ in key) or "default")
            host = start_devhost(self._log_dir, self.env(overrides), name=f"{name}-{len(self._hosts)}")
            self._hosts[key] = host
        return host

    def fresh(self, **overrides: str) -> tuple[Service, dict[str, str]]:
        """A host of its own (not shared with other tests) and its environment, for tests that kill or
        clone hosts; the test stops it (or leaves it to `stop_all`)."""
        env = self.env(overrides)
        return self.start(env), env

    def start(self, env: dict[str, str]) -> Service:
        """Another host process with exactly this environment: same tables and queues as its peers,
        like one more instance of the same function app."""
        self._extra += 1
        host = start_devhost(self._log_dir, env, name=f"devhost-{env['TABLE_PREFIX']}-{self._extra}")
        self._others.append(host)
        return host

    def url(self, path: str, **overrides: str) -> str:
        return self.get(**overrides).urls["base"] + path

    def stop_all(self) -> None:
        hosts = [h for h in [*self._hosts.values(), *self._others] if h.alive()]
        for host in hosts:  # signal all first, so their graceful stops overlap
            with contextlib.suppress(ProcessLookupError):
                os.killpg(host.proc.pid, signal.SIGTERM)
        for host in hosts:
            host.stop()


@pytest.fixture(scope="session")
def hosts(log_dir: Path, azurite: Service, emulators: Service) -> Iterator[HostPool]:
    pool = HostPool(log_dir, azurite, emulators)
    yield pool
    pool.stop_all()


@pytest.fixture
async def http(request: pytest.FixtureRequest) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for a test's requests to hosts (one per test, closed at its end).

    Every answer from a path under openapi.yaml's basePath is checked against it (tests/openapi_answers.py):
    an answer it does not describe fails the request with OpenApiViolation, naming route, status and fault.
    One that the test caught and went on from fails the test at teardown."""
    seen: list[OpenApiViolation] = []
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=60), trace_configs=[spec_answers().trace_config(seen)]
    ) as session:
        yield session
    if seen and not request.node.stash.get(_CALL_FAILED, False):
        raise OpenApiViolation(
            f"{len(seen)} answer(s) the test caught did not match openapi.yaml; the first:\n{seen[0]}"
        )
