"""Session-wide real services: Azurite and the emulators, started once on free loopback ports.

Tests that need the app start a development host with the settings they need (`devhost_factory`);
hosts are kept per distinct settings so that tests sharing a configuration share a process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devhost.services import Service, start_azurite, start_emulators


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
