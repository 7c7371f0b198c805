"""What every benchmark needs: its own Azurite, emulators and development hosts on loopback, stopped at the end.

The benchmarks must not share services with each other or with a test session (a shared emulator's call
record or a shared Azurite's load would mix into the figures), so each script starts a `Stack` of its
own on free loopback ports and stops it whatever happens. Every wait is bounded in time. Azurite is
started here rather than with `devhost.services.start_azurite` because the gateway benchmark needs
Azurite's `--debug` request log to count the Table Storage requests alertgate makes; otherwise the
command line is the same (loopback, telemetry off, in memory).

Also here: the nearest-rank percentile used by every table, a bearer token fetched straight from the
identity emulator (for the direct calls the gateway is compared with), the host process's resident
memory from /proc, and a line saying which code was measured, because figures are only worth quoting
with the commit (and any uncommitted change) they came from.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import aiohttp

from devhost.services import (
    REPO_ROOT,
    Service,
    local_app_env,
    start_azurite,
    start_devhost,
    start_emulators,
)

MDE_RESOURCE = "https://api.securitycenter.microsoft.com"
# Not a schedule that comes round during a run: a sweep's Table query would land among the requests
# the gateway benchmark attributes to one POST.
RARE_SCHEDULE = "0 0 0 1 1 *"


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (the value at rank ceil(fraction * n)); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def alert_id(n: int) -> str:
    """A valid MDE alert id (`da` + 18 digits + `_` + digits), distinct for each n."""
    return f"da{637000000000000000 + n:018d}_{n % 1000}"


def code_state() -> str:
    """The commit measured and whether the app's code differed from it, e.g. `0f8c196 (+ uncommitted
    changes in shared/sender.py)`; `unknown` without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "function_app.py", "shared", "devhost", "host.json"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    paths = sorted(line[3:] for line in changed if line.strip())
    return head + (f" (+ uncommitted changes in {', '.join(paths)})" if paths else "")


def write_output(lines: list[str], out: Path) -> None:
    """Keep a benchmark's printed lines in `out` (bench/results/...) and say where, relative to the repo."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    shown = out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out
    print(f"output: {shown}", flush=True)


def header(title: str) -> str:
    """The first lines of every benchmark's output: what ran, on which code, on what machine, and how
    busy the machine already was (other work on 2 cores shows in every figure)."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{title}\n"
        f"code: {code_state()}; {os.cpu_count()} cores, load average {load} at start; "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
    )


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident since the process started) in KiB, from /proc."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values


async def fetch_token(session: aiohttp.ClientSession, identity_url: str, identity_header: str) -> str:
    """A bearer token for MDE from the identity emulator, as ManagedIdentityCredential would get it."""
    params = {"api-version": "2019-08-01", "resource": MDE_RESOURCE}
    async with session.get(
        identity_url, params=params, headers={"X-IDENTITY-HEADER": identity_header}
    ) as response:
        response.raise_for_status()
        body = await response.json()
    return str(body["access_token"])


@functools.cache
def emulator_options() -> frozenset[str]:
    """The command-line options `python -m emulators` accepts here, from its --help: a benchmark asks
    for a capability (say `--patch-rate-limits`, which the PATCH emulator adds) before relying on it,
    instead of finding out from an emulator that will not start."""
    try:
        shown = subprocess.run(
            [sys.executable, "-m", "emulators", "--help"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(word.rstrip(",") for word in shown.split() if word.startswith("--"))


@dataclass
class Stack:
    """Azurite, the emulators and any number of development hosts for one benchmark, in a temporary
    directory for their logs: `with Stack(...) as stack:` stops every service on the way out (hosts
    first, so none of them logs errors about storage going away), whatever happened inside."""

    emulator_rate_limits: str = "10/60,500/3600"
    # The PATCH API's own windows (`--patch-rate-limits`); None leaves the flag out, for emulators
    # without it (see `emulator_options`).
    emulator_patch_rate_limits: str | None = None
    azurite_debug: bool = False
    log_dir: Path = field(init=False)
    azurite: Service = field(init=False)
    emulators: Service = field(init=False)
    hosts: list[Service] = field(default_factory=list, init=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False)

    def __enter__(self) -> Stack:
        self._tmp = tempfile.TemporaryDirectory(prefix="alertgate-bench-")
        self.log_dir = Path(self._tmp.name)
        try:
            debug = self.log_dir / "azurite-debug.log" if self.azurite_debug else None
            self.azurite = start_azurite(self.log_dir, debug_log=debug)
            extra = ["--rate-limits", self.emulator_rate_limits]
            if self.emulator_patch_rate_limits is not None:
                extra += ["--patch-rate-limits", self.emulator_patch_rate_limits]
            self.emulators = start_emulators(self.log_dir, extra_args=extra)
        except BaseException:
            self._stop_all()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop_all()

    def _stop_all(self) -> None:
        for service in [*self.hosts, getattr(self, "emulators", None), getattr(self, "azurite", None)]:
            if service is not None:
                with contextlib.suppress(Exception):
                    service.stop()
        self.hosts.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def debug_log(self) -> Path:
        return self.log_dir / "azurite-debug.log"

    @property
    def mde_url(self) -> str:
        return self.emulators.urls["mde"]

    def host_env(self, overrides: dict[str, str]) -> dict[str, str]:
        """The app's environment against this stack, with tables and queues of its own (as the tests'
        HostPool.env does) and no sweep during the run; `overrides` win."""
        tag = f"b{uuid.uuid4().hex[:8]}"
        settings = {
            "TABLE_PREFIX": tag,
            "CHUNKS_QUEUE": f"chunks-{tag}",
            "REQUESTS_QUEUE": f"requests-{tag}",
            "SWEEP_SCHEDULE": RARE_SCHEDULE,
            **overrides,
        }
        return local_app_env(
            connection_string=self.azurite.urls["connection_string"],
            mde_url=self.emulators.urls["mde"],
            identity_url=self.emulators.urls["identity"],
            identity_header=self.emulators.urls["identity_header"],
            overrides=settings,
        )

    def start_host(self, overrides: dict[str, str], name: str = "devhost") -> Service:
        """A development host serving function_app against this stack (ready when it listens)."""
        env = self.host_env(overrides)
        host = start_devhost(self.log_dir, env, name=f"{name}-{len(self.hosts)}")
        host.urls["table_prefix"] = env["TABLE_PREFIX"]
        self.hosts.append(host)
        return host

    def stop_host(self, host: Service) -> None:
        host.stop()
        if host in self.hosts:
            self.hosts.remove(host)
