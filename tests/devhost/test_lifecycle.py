"""Process-level behaviour: graceful SIGTERM, the shutdown hook, the command-line files, config errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
from azure.data.tables.aio import TableClient

from devhost.services import REPO_ROOT, Service, free_port, start_devhost, wait_for_port
from tests.devhost.conftest import SAMPLE_APP, eventually, rows, sample_env

SAMPLE_KEYS = ("AzureWebJobsStorage", "SAMPLE_QUEUE", "SAMPLE_TABLE", "SAMPLE_TICK_SCHEDULE")


def devhost_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "devhost", "--app", SAMPLE_APP, "--host", "127.0.0.1", *args]


def spawn(argv: list[str], env: dict[str, str], log_path: Path) -> Service:
    """devhost with flags start_devhost does not pass, in its own process group like the services."""
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Service(log_path.stem, proc, log_path)


async def test_sigterm_drains_in_flight_request_then_runs_shutdown_hook(
    log_dir: Path, azurite: Service
) -> None:
    env = sample_env(azurite, "lifecycle")
    service = start_devhost(log_dir, env, app=SAMPLE_APP, name="devhost-lifecycle")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:

            async def slow() -> tuple[int, str]:
                async with http.get(service.urls["base"] + "/api/slow?seconds=1.5") as response:
                    return response.status, await response.text()

            request = asyncio.create_task(slow())

            async def log() -> str:
                return service.log_path.read_text(errors="replace")

            await eventually(log, lambda text: "Executing 'Functions.slow'" in text, within=5)
            began = time.monotonic()
            returncode = await asyncio.to_thread(service.stop)  # SIGTERM, then waits (kills after 10 s)
            assert await asyncio.wait_for(request, 5) == (200, "done")
        assert returncode == 0
        assert time.monotonic() - began < 9
    finally:
        service.stop()
    async with TableClient.from_connection_string(env["AzureWebJobsStorage"], env["SAMPLE_TABLE"]) as table:
        assert [r["RowKey"] for r in await rows(table, "shutdown")] == [str(service.proc.pid)]


async def test_command_line_reads_host_json_and_local_settings(
    tmp_path: Path, log_dir: Path, azurite: Service
) -> None:
    """routePrefix from --host-json; Values and LocalHttpPort from --settings; the environment wins."""
    port = free_port()
    from_file = sample_env(azurite, "fromfile")
    (tmp_path / "host.json").write_text(
        json.dumps({"version": "2.0", "extensions": {"http": {"routePrefix": "v1"}}})
    )
    settings = {
        "IsEncrypted": False,
        "Values": {key: from_file[key] for key in SAMPLE_KEYS},
        "Host": {"LocalHttpPort": port},
    }
    (tmp_path / "local.settings.json").write_text(json.dumps(settings))
    env = {k: v for k, v in os.environ.items() if k not in SAMPLE_KEYS}
    env["SAMPLE_TABLE"] = env_table = f"tenv{uuid.uuid4().hex[:8]}"
    argv = devhost_argv(
        "--host-json", str(tmp_path / "host.json"), "--settings", str(tmp_path / "local.settings.json")
    )
    service = spawn(argv, env, log_dir / "devhost-cli.log")
    try:
        wait_for_port(port, timeout=20, proc=service.proc)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(base + "/v1/echo/x") as response:
                assert response.status == 200
            async with http.get(base + "/api/echo/x") as response:
                assert response.status == 404
        async with TableClient.from_connection_string(from_file["AzureWebJobsStorage"], env_table) as table:
            await eventually(lambda: rows(table, "timer"), bool, within=5)
        async with TableClient.from_connection_string(
            from_file["AzureWebJobsStorage"], from_file["SAMPLE_TABLE"]
        ) as table:
            assert await rows(table, "timer") == []
    finally:
        returncode = service.stop()
    assert returncode == 0, service.log_tail()


def test_missing_setting_stops_start_up_with_a_clear_message(azurite: Service) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SAMPLE_KEYS}
    env["AzureWebJobsStorage"] = azurite.urls["connection_string"]
    env["SAMPLE_TABLE"] = "tunused"
    env["SAMPLE_TICK_SCHEDULE"] = "0 0 0 1 1 *"
    result = subprocess.run(
        devhost_argv("--no-local-settings", "--port", str(free_port())),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert (
        "function work: app setting 'SAMPLE_QUEUE' (referenced as %SAMPLE_QUEUE%) is not set" in result.stderr
    )
