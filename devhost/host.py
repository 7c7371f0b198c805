"""The core of the development host: load the FunctionApp, discover its functions, invoke them, serve HTTP.

Functions are discovered from the app object itself (`app.get_functions()`), the same indexing the
Python worker does, so a new function needs no change here. Invocation follows the worker: an async
function runs on the host's event loop (so an aiohttp session the app keeps is reused across
invocations), a plain function runs in a worker thread, and a parameter named `context` gets a small
invocation context. Queue and timer triggers live in `queues.py` and `timers.py`; they call the same
`Invoker`, which counts what is in flight so that shutdown can wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import ModuleType
from typing import Any
from urllib.parse import unquote

import azure.functions as func
from aiohttp import web
from azure.functions.decorators.constants import HTTP_OUTPUT, HTTP_TRIGGER, QUEUE_TRIGGER, TIMER_TRIGGER
from azure.functions.decorators.core import Trigger
from multidict import CIMultiDict

from devhost.config import ConfigError

log = logging.getLogger("devhost")

SUPPORTED_TRIGGERS = (HTTP_TRIGGER, QUEUE_TRIGGER, TIMER_TRIGGER)
# The real Functions host's request size limit; aiohttp's own default (1 MiB) would make the server
# answer 413 before the app can apply (and explain) its own, smaller MAX_BODY_BYTES.
MAX_REQUEST_BYTES = 100 * 1024 * 1024
_HOP_BY_HOP = frozenset({"content-length", "transfer-encoding", "connection"})


# --- loading and discovery -------------------------------------------------------------------------


def load_app(target: str) -> tuple[func.FunctionApp, ModuleType]:
    """Import `module:attribute` with the working directory (the repo root) importable, as the worker does."""
    module_name, _, attribute = target.partition(":")
    if not module_name:
        raise ConfigError(f"--app {target!r}: expected MODULE:ATTRIBUTE, e.g. function_app:app")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    module = importlib.import_module(module_name)
    app = getattr(module, attribute or "app", None)
    if not isinstance(app, func.FunctionApp):
        raise ConfigError(f"--app {target!r}: {attribute or 'app'} is not an azure.functions.FunctionApp")
    return app, module


@dataclass(frozen=True)
class FunctionSpec:
    """One discovered function: what triggers it and how to call it."""

    name: str
    trigger: Trigger
    func: Callable[..., Any]
    arg_name: str
    wants_context: bool

    @property
    def kind(self) -> str:
        return str(self.trigger.type)


def discover(app: func.FunctionApp) -> tuple[list[FunctionSpec], list[str]]:
    """The functions devhost can run, and a warning for every trigger or binding it cannot."""
    specs: list[FunctionSpec] = []
    warnings: list[str] = []
    for function in app.get_functions():
        name = str(function.get_function_name())
        trigger = function.get_trigger()
        if trigger is None or trigger.type not in SUPPORTED_TRIGGERS:
            kind = trigger.type if trigger is not None else "no trigger"
            warnings.append(f"function {name}: trigger {kind} is not supported by devhost; not loaded")
            continue
        for binding in function.get_bindings():
            if binding is trigger or (
                trigger.type == HTTP_TRIGGER and binding.type == HTTP_OUTPUT and binding.name == "$return"
            ):
                continue
            warnings.append(
                f"function {name}: {binding.type} binding {binding.name!r} is not supported by devhost "
                "and will not be passed to the function"
            )
        user_function = function.get_user_function()
        parameters = inspect.signature(user_function).parameters
        specs.append(FunctionSpec(name, trigger, user_function, trigger.name, "context" in parameters))
    return specs, warnings


# --- invocation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InvocationContext:
    """What the worker passes to a parameter named `context` (the commonly used part of func.Context)."""

    invocation_id: str
    function_name: str
    function_directory: str
    trace_context: None = None
    retry_context: None = None


class InFlight:
    """Counts running invocations and owns the background tasks that run them, so shutdown can drain them.

    Once `close()` is called, new HTTP requests are refused (503): work must not start after the app's
    shutdown hook may have closed its sessions.
    """

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self._count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._count -= 1
            if self._count == 0:
                self._idle.set()

    def spawn(self, work: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Run `work` as a tracked task (queue messages: invocation plus settling the message)."""

        async def tracked() -> None:
            with self.track():
                await work

        task = asyncio.get_running_loop().create_task(tracked(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    def close(self) -> None:
        self.closed = True

    async def drain(self, seconds: float) -> int:
        """Wait up to `seconds` for everything in flight, then cancel our own tasks; how many were left."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), seconds)
        left = self._count
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return left


class Invoker:
    """Calls user functions the way the Python worker does, logging each run like the host."""

    def __init__(self, inflight: InFlight, function_directory: str) -> None:
        self._inflight = inflight
        self._directory = function_directory

    async def __call__(self, spec: FunctionSpec, trigger_value: object, reason: str) -> Any:
        invocation_id = str(uuid.uuid4())
        kwargs: dict[str, Any] = {spec.arg_name: trigger_value}
        if spec.wants_context:
            kwargs["context"] = InvocationContext(invocation_id, spec.name, self._directory)
        log.info("Executing 'Functions.%s' (Reason='%s', Id=%s)", spec.name, reason, invocation_id)
        started = time.monotonic()
        done = "Executed 'Functions.%s' (%s, Id=%s, Duration=%dms)"
        with self._inflight.track():
            try:
                result = await _call(spec.func, kwargs)
            except Exception:
                elapsed = (time.monotonic() - started) * 1000
                log.exception(done, spec.name, "Failed", invocation_id, elapsed)
                raise
        log.info(done, spec.name, "Succeeded", invocation_id, (time.monotonic() - started) * 1000)
        return result


async def _call(function: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(function):
        return await function(**kwargs)
    result = await asyncio.to_thread(function, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


# --- HTTP routes -----------------------------------------------------------------------------------

_PARAMETER = re.compile(r"\{([^{}]+)\}")
# A few ASP.NET route constraints are honoured (a mismatch is a 404, as in the real host); any other
# constraint is ignored and the parameter matches one path segment.
_CONSTRAINTS = {
    "int": r"-?\d+",
    "long": r"-?\d+",
    "bool": r"(?i:true|false)",
    "alpha": r"[A-Za-z]+",
    "guid": r"[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}",
}


@dataclass(frozen=True)
class _Parameter:
    name: str
    pattern: str
    optional: bool
    catch_all: bool
    default: str | None
    constrained: bool

    @classmethod
    def parse(cls, inner: str) -> _Parameter:
        """`{name}`, `{name?}`, `{name:int}`, `{name=default}`, `{*rest}` (ASP.NET route template syntax)."""
        catch_all = inner.startswith("*")
        inner = inner.lstrip("*")
        optional = inner.endswith("?")
        inner = inner.rstrip("?")
        inner, has_default, default = inner.partition("=")
        name, *constraints = inner.split(":")
        pattern = ".*" if catch_all else "[^/]+"
        known = [c for c in (c.split("(")[0].lower() for c in constraints) if c in _CONSTRAINTS]
        if known and not catch_all:
            pattern = _CONSTRAINTS[known[0]]
        return cls(
            name=name.strip(),
            pattern=pattern,
            optional=optional or bool(has_default) or catch_all,
            catch_all=catch_all,
            default=default if has_default else None,
            constrained=bool(constraints),
        )

    def rank(self) -> int:
        if self.catch_all:
            return 5
        if self.optional:
            return 4
        return 2 if self.constrained else 3


@dataclass(frozen=True)
class RouteTemplate:
    """A compiled route template: `api/items/{id:int}/{part?}` → a regex plus the parameter names."""

    template: str
    regex: re.Pattern[str]
    groups: Mapping[str, str]
    defaults: Mapping[str, str]
    rank: tuple[int, ...]

    @classmethod
    def compile(cls, template: str) -> RouteTemplate:
        parts: list[str] = []
        groups: dict[str, str] = {}
        defaults: dict[str, str] = {}
        rank: list[int] = []
        for segment in (s for s in template.strip("/").split("/") if s):
            whole = _PARAMETER.fullmatch(segment)
            if whole:
                parameter = _Parameter.parse(whole.group(1))
                group = f"g{len(groups)}"
                groups[group] = parameter.name
                if parameter.default is not None:
                    defaults[parameter.name] = parameter.default
                capture = f"(?P<{group}>{parameter.pattern})"
                parts.append(f"(?:/{capture})?" if parameter.optional else f"/{capture}")
                rank.append(parameter.rank())
                continue
            parts.append("/" + cls._complex_segment(segment, groups))
            rank.append(0 if "{" not in segment else 1)
        regex = re.compile("^" + "".join(parts) + "/?$", re.IGNORECASE)
        return cls(template, regex, groups, defaults, tuple(rank))

    @staticmethod
    def _complex_segment(segment: str, groups: dict[str, str]) -> str:
        """A literal segment, or one mixing literals and parameters such as `{name}.{ext}`."""
        pattern = ""
        position = 0
        for match in _PARAMETER.finditer(segment):
            pattern += re.escape(segment[position : match.start()])
            parameter = _Parameter.parse(match.group(1))
            group = f"g{len(groups)}"
            groups[group] = parameter.name
            pattern += f"(?P<{group}>{parameter.pattern.replace('[^/]+', '[^/]+?')})"
            position = match.end()
        return pattern + re.escape(segment[position:])

    def match(self, raw_path: str) -> dict[str, str] | None:
        """Route values for a raw (percent-encoded) path, decoded; None when the path does not match."""
        found = self.regex.match(raw_path)
        if found is None:
            return None
        values = dict(self.defaults)
        for group, value in found.groupdict().items():
            if value is not None:
                values[self.groups[group]] = unquote(value)
        return values


@dataclass(frozen=True)
class HttpRoute:
    spec: FunctionSpec
    template: RouteTemplate
    methods: frozenset[str] | None

    def describe(self, base_url: str) -> str:
        methods = ",".join(sorted(self.methods)) if self.methods else "*"
        auth = getattr(self.spec.trigger, "auth_level", None)
        auth_text = f" (auth {_text(auth)}, not enforced)" if auth is not None else ""
        return f"{self.spec.name}: httpTrigger [{methods}] {base_url}/{self.template.template}{auth_text}"


def _text(value: object) -> str:
    return str(value.value) if isinstance(value, Enum) else str(value)


def _methods(declared: Iterable[object] | None) -> frozenset[str] | None:
    if not declared:
        return None
    return frozenset(_text(method).upper() for method in declared)


@dataclass
class HttpRouter:
    """Every HTTP function's route under the route prefix, literal segments tried before parameters."""

    routes: list[HttpRoute] = field(default_factory=list)

    @classmethod
    def build(cls, specs: Iterable[FunctionSpec], route_prefix: str) -> HttpRouter:
        routes = []
        for spec in specs:
            if spec.kind != HTTP_TRIGGER:
                continue
            route = getattr(spec.trigger, "route", None) or spec.name
            template = "/".join(p for p in (route_prefix.strip("/"), str(route).strip("/")) if p)
            methods = _methods(getattr(spec.trigger, "methods", None))
            routes.append(HttpRoute(spec, RouteTemplate.compile(template), methods))
        routes.sort(key=lambda r: r.template.rank)
        return cls(routes)

    def match(self, method: str, raw_path: str) -> tuple[FunctionSpec, dict[str, str]] | None:
        """The first route matching path and method (a known path with another method: 404, as in Azure)."""
        for route in self.routes:
            if route.methods is not None and method.upper() not in route.methods:
                continue
            values = route.template.match(raw_path)
            if values is not None:
                return route.spec, values
        return None


# --- HTTP translation ------------------------------------------------------------------------------


def _joined(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Repeated keys joined with "," (how the host flattens ASP.NET's multi-valued headers and query)."""
    joined: dict[str, str] = {}
    for key, value in pairs:
        joined[key] = f"{joined[key]},{value}" if key in joined else value
    return joined


def to_function_request(request: web.Request, body: bytes, route_values: dict[str, str]) -> func.HttpRequest:
    """The azure.functions request the worker would build (a `code` query parameter included, unchanged)."""
    return func.HttpRequest(
        method=request.method,
        url=str(request.url),
        headers=_joined((k.lower(), v) for k, v in request.headers.items()),
        params=_joined(request.query.items()),
        route_params=route_values,
        body=body,
    )


def _content_type(mimetype: str, charset: str) -> str:
    """As the worker's HttpResponseConverter: a charset only for text/* types."""
    return f"{mimetype}; charset={charset}" if mimetype.startswith("text/") else mimetype


def to_web_response(result: object) -> web.Response:
    """An aiohttp response for what the function returned (an HttpResponse, or a str as the worker allows)."""
    if isinstance(result, str):
        result = func.HttpResponse(result)
    if not isinstance(result, func.HttpResponse):
        raise TypeError(f"expected azure.functions.HttpResponse or str, got {type(result).__name__}")
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in result.headers.items():
        if name.lower() not in _HOP_BY_HOP:
            headers.add(name, value)
    if "Content-Type" not in headers:
        headers["Content-Type"] = _content_type(result.mimetype, result.charset)
    status = int(result.status_code)
    body = result.get_body() if status >= 200 and status not in (204, 304) else None
    return web.Response(status=status, headers=headers, body=body)


def build_http_app(router: HttpRouter, invoke: Invoker, inflight: InFlight) -> web.Application:
    """One catch-all aiohttp handler that dispatches with the Functions routing rules."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if inflight.closed:
            return web.Response(status=503, headers={"Retry-After": "1"})
        found = router.match(request.method, request.rel_url.raw_path)
        if found is None:
            return web.Response(status=404)
        spec, route_values = found
        body = await request.read()
        try:
            result = await invoke(spec, to_function_request(request, body, route_values), "HTTP request")
        except Exception:
            # The real host answers 500 with an empty body; the Invoker has logged the traceback.
            return web.Response(status=500)
        try:
            return to_web_response(result)
        except (TypeError, ValueError) as exc:
            log.error("function %s: cannot send its result: %s", spec.name, exc)
            return web.Response(status=500)

    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
