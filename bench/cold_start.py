"""How long a new alertgate process takes: importing function_app, and a development host's first answer.

    python -m bench.cold_start [--imports 7] [--hosts 5]

A Functions instance that scales out or restarts imports the app before it can take an invocation, so the
import is on the path of the first request every new instance serves (issue 6: at most 300 ms). Two
measurements:

1. The import alone: `import function_app` timed inside a fresh interpreter (`time.perf_counter` around
   the statement) with a minimal environment (only `AzureWebJobsStorage`, which the settings require),
   `--imports` times after one unmeasured run that writes the bytecode caches; plus the whole process
   (interpreter start, import, exit) against an interpreter that imports nothing, and the modules that
   cost most according to `python -X importtime`.
2. The first answer: from starting a development host process (`python -m devhost`, as
   `devhost.services.start_devhost` runs it) to the first `POST /api/alerts/batchUpdate` answered,
   `--hosts` times, each host with tables and queues of its own (so each creates them, as the first
   instance on a new storage account would). The request is retried every 10 ms until the host
   listens; the time splits into "listening" (when the attempt that got through was sent) and that
   first request's own time, which builds the runtime (token, storage clients, tables and queues).

Bounded: counts are capped, every subprocess and request has a timeout, and every service is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import aiohttp

from bench.common import Stack, alert_id, header
from devhost.services import LOOPBACK, REPO_ROOT, Service, free_port

TARGET_IMPORT_MS = 300.0
MAX_RUNS = 50
SUBPROCESS_TIMEOUT = 60.0
FIRST_ANSWER_TIMEOUT = 60.0
WHOLE_LABEL = 'whole process: python -c "import function_app"'
TIMED_IMPORT = (
    "import time, sys\n"
    "began = time.perf_counter()\n"
    "import function_app\n"
    "sys.stdout.write(repr(time.perf_counter() - began))\n"
)


def minimal_env(connection_string: str) -> dict[str, str]:
    """Only what the settings need to load: no local.settings.json, no inherited environment."""
    return {"AzureWebJobsStorage": connection_string}


def run_python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter in the repo root with this environment, its output captured (bounded)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=True,
    )


def timed_import(env: dict[str, str]) -> float:
    """Seconds `import function_app` took in a fresh interpreter."""
    return float(run_python(["-c", TIMED_IMPORT], env).stdout.strip())


def process_seconds(code: str, env: dict[str, str]) -> float:
    """Wall time of a whole `python -c code` process: start, run, exit."""
    began = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, timeout=SUBPROCESS_TIMEOUT, check=True
    )
    return time.perf_counter() - began


def import_breakdown(env: dict[str, str], top: int = 6) -> list[tuple[str, float]]:
    """function_app's direct imports that cost most (cumulative ms), from `python -X importtime`."""
    done = run_python(["-X", "importtime", "-c", "import function_app"], env)
    direct: list[tuple[str, float]] = []
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2]
        # `-X importtime` indents a module by two spaces per level below the one that imported it.
        if name.startswith("   ") and not name.startswith("    "):
            direct.append((name.strip(), int(parts[1]) / 1000))
    return sorted(direct, key=lambda item: item[1], reverse=True)[:top]


@dataclass
class FirstAnswer:
    listening: float  # start → the attempt that got through was sent
    total: float  # start → its answer
    status: int


async def first_answer(url: str, began: float, proc: subprocess.Popen[bytes]) -> FirstAnswer:
    """POST every 10 ms until one is answered; the host process must stay alive meanwhile."""
    body = {"alertIds": [alert_id(int(began * 1000) % 10**9)], "status": "InProgress"}
    timeout = aiohttp.ClientTimeout(total=FIRST_ANSWER_TIMEOUT, sock_connect=1.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.perf_counter() - began < FIRST_ANSWER_TIMEOUT:
            if proc.poll() is not None:
                raise RuntimeError(f"the development host exited with {proc.returncode} before answering")
            sent = time.perf_counter()
            try:
                async with session.post(url, json=body) as response:
                    await response.read()
                    return FirstAnswer(sent - began, time.perf_counter() - began, response.status)
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.01)
    raise TimeoutError(f"no answer from the development host within {FIRST_ANSWER_TIMEOUT:g} s")


def start_to_first_answer(stack: Stack, run: int) -> FirstAnswer:
    port = free_port()
    env = stack.host_env({})
    argv = [
        sys.executable, "-m", "devhost", "--app", "function_app:app",
        "--host", LOOPBACK, "--port", str(port), "--no-local-settings",
    ]  # fmt: skip
    log_path = stack.log_dir / f"cold-devhost-{run}.log"
    with open(log_path, "wb") as log:
        began = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    service = Service(name=f"cold-devhost-{run}", proc=proc, log_path=log_path)
    try:
        url = f"http://{LOOPBACK}:{port}/api/alerts/batchUpdate"
        return asyncio.run(first_answer(url, began, proc))
    except BaseException as exc:
        raise RuntimeError(f"{exc}\n{service.log_tail()}") from exc
    finally:
        service.stop()


def ms(values: list[float]) -> str:
    scaled = [v * 1000 for v in values]
    return f"{statistics.median(scaled):>8.1f} {min(scaled):>8.1f} {max(scaled):>8.1f}"


def run(imports: int, hosts: int) -> None:
    began = time.monotonic()
    print(header("bench.cold_start: importing function_app, and a new host's first answer"), flush=True)
    with Stack() as stack:
        env = minimal_env(stack.azurite.urls["connection_string"])
        first_import = timed_import(env)  # writes the bytecode caches if they are missing
        import_times = [timed_import(env) for _ in range(imports)]
        bare = [process_seconds("pass", env) for _ in range(imports)]
        whole = [process_seconds("import function_app", env) for _ in range(imports)]
        breakdown = import_breakdown(env)
        answers = [start_to_first_answer(stack, run) for run in range(hosts)]

    head = f"{'':<58} {'median':>8} {'min':>8} {'max':>8}"
    median_import = statistics.median(import_times) * 1000
    lines = [
        "",
        f"1. import function_app in a fresh interpreter, environment only AzureWebJobsStorage, "
        f"{imports} runs (ms)",
        head,
        "-" * len(head),
        f"{'`import function_app`, timed inside the interpreter':<58} {ms(import_times)}",
        f"{WHOLE_LABEL:<58} {ms(whole)}",
        f"{'whole process: python -c pass (interpreter alone)':<58} {ms(bare)}",
        f"first, unmeasured run (bytecode caches written if missing): {first_import * 1000:.1f} ms",
        "function_app's direct imports that cost most (python -X importtime, cumulative ms): "
        + ", ".join(f"{name} {cost:.1f}" for name, cost in breakdown),
        f"target import of function_app <= {TARGET_IMPORT_MS:g} ms: "
        + (
            f"met ({median_import:.1f} ms median)"
            if median_import <= TARGET_IMPORT_MS
            else f"MISSED by {median_import - TARGET_IMPORT_MS:.1f} ms ({median_import:.1f} ms median)"
        ),
        "",
        f"2. starting a development host process -> its first POST /api/alerts/batchUpdate answered, "
        f"{hosts} runs (ms)",
        head,
        "-" * len(head),
        f"{'start -> listening (the attempt that got through was sent)':<58} "
        f"{ms([a.listening for a in answers])}",
        f"{'first request (builds the runtime, creates tables/queues)':<58} "
        f"{ms([a.total - a.listening for a in answers])}",
        f"{'start -> first answer':<58} {ms([a.total for a in answers])}",
        f"answers: {sorted(a.status for a in answers)}",
        f"\ntotal {time.monotonic() - began:.1f} s",
    ]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n")[0])
    parser.add_argument("--imports", type=int, default=7, help="measured imports (7)")
    parser.add_argument("--hosts", type=int, default=5, help="development hosts started (5)")
    args = parser.parse_args(argv)
    for name in ("imports", "hosts"):
        if not 1 <= getattr(args, name) <= MAX_RUNS:
            parser.error(f"--{name} must be 1 to {MAX_RUNS}")
    run(args.imports, args.hosts)


if __name__ == "__main__":
    main()
