"""`python -m devhost`: run a FunctionApp locally the way `func start` would.

    python -m devhost [--app function_app:app] [--host 127.0.0.1] [--port 7071]
                      [--no-local-settings] [--settings local.settings.json] [--host-json host.json]

Start-up order follows Core Tools: local.settings.json `Values` into the environment (an existing
environment variable wins), host.json, telemetry as the Functions worker would set it up
(devhost/telemetry.py: off unless asked for), then the app module is imported (so settings it reads at import
are in place), its functions are discovered, and HTTP, queue polling and timers start. Once listening it
prints `DEVHOST READY http://HOST:PORT` and one line per function, flushed.

On SIGTERM or SIGINT it stops polling and timers, refuses new HTTP requests, waits up to DRAIN_SECONDS
for invocations in flight, then awaits the app module's `async def shutdown()` if there is one (the
app closes its aiohttp session and credential there; Azure simply ends the worker), and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import azure.functions as func
from aiohttp import web
from azure.functions.decorators.constants import HTTP_TRIGGER, QUEUE_TRIGGER, TIMER_TRIGGER

from devhost.config import ConfigError, HostConfig, load_host_json, load_local_settings
from devhost.host import FunctionSpec, HttpRouter, InFlight, Invoker, build_http_app, discover, load_app
from devhost.queues import QueueBinding, QueueListener
from devhost.timers import TimerBinding, TimerRunner

log = logging.getLogger("devhost")

DEFAULT_PORT = 7071
# devhost.services.Service.stop() sends SIGTERM and kills after 10 s: draining (7 s) plus the app's
# shutdown hook (2 s) stay inside that, so a clean stop is never turned into a kill.
DRAIN_SECONDS = 7.0
SHUTDOWN_HOOK_SECONDS = 2.0
QUEUE_PREPARE_SECONDS = 10.0  # creating the queues before listening; start_devhost waits 30 s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devhost", description="Local host for a FunctionApp.")
    add = parser.add_argument
    add("--app", default="function_app:app", help="MODULE:ATTRIBUTE of the FunctionApp")
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, default=None, help="default: local.settings.json Host.LocalHttpPort, else 7071")
    add("--no-local-settings", action="store_true", help="do not read local.settings.json")
    add("--settings", type=Path, default=None, help="local settings file (default local.settings.json)")
    add("--host-json", type=Path, default=None, help="host.json (default ./host.json if present)")
    return parser.parse_args(argv)


@dataclass
class Plan:
    """Everything discovered and resolved before anything starts listening."""

    specs: list[FunctionSpec]
    config: HostConfig
    router: HttpRouter
    queues: list[QueueBinding] = field(default_factory=list)
    timers: list[TimerBinding] = field(default_factory=list)

    def describe(self, base_url: str) -> list[str]:
        lines = {route.spec.name: route.describe(base_url) for route in self.router.routes}
        lines.update({binding.spec.name: binding.describe() for binding in self.queues})
        lines.update({binding.spec.name: binding.describe() for binding in self.timers})
        return [lines[spec.name] for spec in self.specs if spec.name in lines]


def make_plan(app: func.FunctionApp, config: HostConfig) -> Plan:
    """Discover the app's functions and resolve their settings, reporting every problem at once."""
    specs, warnings = discover(app)
    for warning in warnings:
        log.warning("%s", warning)
    plan = Plan(specs, config, HttpRouter.build(specs, config.route_prefix))
    errors: list[str] = []
    for spec in specs:
        try:
            if spec.kind == QUEUE_TRIGGER:
                plan.queues.append(QueueBinding.resolve(spec, os.environ))
            elif spec.kind == TIMER_TRIGGER:
                plan.timers.append(TimerBinding.resolve(spec, os.environ))
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError("\n".join(errors))
    if not any(spec.kind == HTTP_TRIGGER for spec in specs):
        log.info("the app has no HTTP functions; serving 404 for every path")
    return plan


def _local_settings_port(args: argparse.Namespace) -> int | None:
    """Apply local.settings.json unless told not to; its Host.LocalHttpPort, if any."""
    if args.no_local_settings:
        return None
    path = args.settings or Path("local.settings.json")
    if args.settings is None and not path.exists():
        log.warning("no local.settings.json in %s; using the environment only", Path.cwd())
        return None
    loaded = load_local_settings(path, os.environ)
    if loaded.kept_from_environment:
        log.info("kept from the environment: %s", ", ".join(loaded.kept_from_environment))
    return loaded.http_port


def _host_json(args: argparse.Namespace) -> Path | None:
    if args.host_json is not None:
        return Path(args.host_json)
    default = Path("host.json")
    return default if default.exists() else None


async def _run_shutdown_hook(module: ModuleType) -> None:
    """Await the app module's `shutdown` (a plain function is called too), bounded in time."""
    hook = getattr(module, "shutdown", None)
    if not callable(hook):
        return
    try:
        result = hook()
        if inspect.isawaitable(result):
            await asyncio.wait_for(result, SHUTDOWN_HOOK_SECONDS)
    except Exception:
        log.exception("%s.shutdown() failed", module.__name__)


@dataclass
class Running:
    """What `serve` started and `stop` must end, in order."""

    runner: web.AppRunner
    site: web.TCPSite
    inflight: InFlight
    listeners: list[QueueListener]
    background: list[asyncio.Task[None]]


async def _start(args: argparse.Namespace, port: int, plan: Plan, stop: asyncio.Event) -> Running:
    inflight = InFlight()
    invoke = Invoker(inflight, os.getcwd())
    http_app = build_http_app(plan.router, invoke, inflight)
    runner = web.AppRunner(http_app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    listeners = [QueueListener(binding, plan.config.queues, invoke, inflight) for binding in plan.queues]
    await asyncio.gather(*(listener.prepare(QUEUE_PREPARE_SECONDS) for listener in listeners))
    await runner.setup()
    site = web.TCPSite(runner, args.host, port)
    await site.start()
    loop = asyncio.get_running_loop()
    background = [loop.create_task(each.run(stop), name=each.binding.spec.name) for each in listeners]
    timers = [TimerRunner(binding, invoke) for binding in plan.timers]
    background += [loop.create_task(each.run(stop), name=each.binding.spec.name) for each in timers]
    for task in background:
        task.add_done_callback(_report_crash)
    return Running(runner, site, inflight, listeners, background)


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped unexpectedly", task.get_name(), exc_info=task.exception())


async def _stop(running: Running, module: ModuleType) -> None:
    """Stop taking work, drain what is in flight (bounded), run the app's shutdown hook, close."""
    running.inflight.close()
    await running.site.stop()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_SECONDS
    if running.background:
        await asyncio.wait(running.background, timeout=DRAIN_SECONDS)
    left = await running.inflight.drain(max(0.0, deadline - loop.time()))
    for task in running.background:
        task.cancel()
    await asyncio.gather(*running.background, return_exceptions=True)
    if left:
        log.warning("%d invocation(s) still running after %.0f s were cancelled", left, DRAIN_SECONDS)
    await _run_shutdown_hook(module)
    for listener in running.listeners:
        await listener.close()
    await running.runner.cleanup()


async def serve(args: argparse.Namespace, port: int, plan: Plan, module: ModuleType) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        running = await _start(args, port, plan, stop)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", args.host, port, exc)
        return 1
    base_url = f"http://{args.host}:{running.site.port}"
    print(f"DEVHOST READY {base_url}", flush=True)
    for line in plan.describe(base_url):
        print(f"  {line}", flush=True)
    await stop.wait()
    log.info("shutting down")
    await _stop(running, module)
    log.info("stopped")
    return 0


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDKs log every request at INFO


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _configure_logging()
    try:
        settings_port = _local_settings_port(args)
        config = load_host_json(_host_json(args), os.environ)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    from devhost import telemetry

    log.info("%s", telemetry.configure(os.environ))  # before the app: as the Functions worker does
    try:
        app, module = load_app(args.app)
        plan = make_plan(app, config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except Exception:
        log.exception("cannot load the app %s", args.app)
        return 1
    port = args.port if args.port is not None else settings_port or DEFAULT_PORT
    return asyncio.run(serve(args, port, plan, module))


if __name__ == "__main__":
    sys.exit(main())
