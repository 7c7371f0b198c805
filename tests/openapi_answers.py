"""Every answer a test receives from alertgate is checked against openapi.yaml, the contract callers import.

A route's documented answers are what a Logic App, a Power Automate connector or a generated client is
built against: an undocumented status, a missing header or a body that breaks its schema surfaces there
as a failed run, not here. So the shared `http` fixture (tests/conftest.py) hands every answer from a
path under the spec's basePath to `OpenApiAnswers.violations`, and a test fails naming the route, the
status and what was wrong.

What is checked, for an answer to METHOD PATH with status S:

- the path matches one of the spec's paths (templates such as /operations/{operationId}) and METHOD is
  documented there;
- S is one of that operation's responses (there is no `default` response in openapi.yaml);
- the headers marked `x-required: true` on that response are present (Swagger 2.0 has no `required` on
  response headers, so the extension says which are always sent), and every documented header that is
  present has the documented type (an integer header holds a whole number);
- a response with a schema has a JSON body whose media type is one the spec produces:
  application/problem+json when the schema is Problem, application/json otherwise;
- the body is valid against the schema, JSON Schema draft 4 (of which Swagger 2.0 schemas are a subset)
  with formats checked (uuid, date-time);
- a problem+json body's `status`, when present, is the HTTP status (RFC 9457 §3.1.2).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import yaml  # type: ignore[import-untyped]
from jsonschema import Draft4Validator, FormatChecker  # type: ignore[import-untyped]

OPENAPI = Path(__file__).resolve().parents[1] / "openapi.yaml"
PROBLEM_REF = "#/definitions/Problem"
PROBLEM_JSON = "application/problem+json"
PLAIN_JSON = "application/json"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch")
_WHOLE_NUMBER = re.compile(r"[0-9]+")


class OpenApiViolation(AssertionError):
    """An answer openapi.yaml does not describe; the message names the route, the status and each fault."""


@dataclass(frozen=True)
class Route:
    template: str  # as in the spec, without basePath: /operations/{operationId}
    pattern: re.Pattern[str]
    operations: Mapping[str, Mapping[str, Any]]  # lower-case method → operation object


class OpenApiAnswers:
    """The answers openapi.yaml (Swagger 2.0) documents, and a check of one answer against them."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = spec
        self.base_path = str(spec.get("basePath", "")).rstrip("/")
        self.produces = tuple(spec.get("produces", ()))
        self.routes = tuple(
            Route(template, _template_pattern(template), {m: item[m] for m in HTTP_METHODS if m in item})
            for template, item in spec["paths"].items()
        )
        self._format_checker = FormatChecker()

    @classmethod
    def load(cls, path: Path = OPENAPI) -> OpenApiAnswers:
        return cls(yaml.safe_load(path.read_text(encoding="utf-8")))

    def covers(self, path: str) -> bool:
        """True for a path under the spec's basePath (the app's API; the emulators' own are elsewhere)."""
        return path == self.base_path or path.startswith(self.base_path + "/")

    def route_of(self, path: str) -> Route | None:
        if not self.covers(path):
            return None
        relative = path[len(self.base_path) :] or "/"
        return next((r for r in self.routes if r.pattern.fullmatch(relative)), None)

    def violations(
        self, method: str, path: str, status: int, headers: Mapping[str, str], body: bytes
    ) -> list[str]:
        """What is wrong with this answer, one line each; empty when openapi.yaml describes it.

        `headers` may be any mapping; names are compared case-insensitively."""
        route = self.route_of(path)
        if route is None:
            return [f"{path} is not a path of openapi.yaml ({', '.join(r.template for r in self.routes)})"]
        operation = route.operations.get(method.lower())
        if operation is None:
            return [f"{method.upper()} is not documented for {route.template}"]
        responses = operation.get("responses", {})
        response = responses.get(str(status)) or responses.get("default")
        if response is None:
            documented = ", ".join(sorted(str(s) for s in responses))
            return [f"status {status} is not documented (documented: {documented})"]
        response = self._resolve(response)
        found = self._header_faults(response, headers)
        schema = response.get("schema")
        if schema is not None:
            found += self._body_faults(schema, status, headers, body)
        return found

    def check(self, method: str, path: str, status: int, headers: Mapping[str, str], body: bytes) -> None:
        """Raise OpenApiViolation naming the route, the status and every fault, if there is any."""
        found = self.violations(method, path, status, headers, body)
        if found:
            raise OpenApiViolation(describe(method, path, status, found, body))

    # --- parts ----------------------------------------------------------------------------------------

    def _resolve(self, node: Mapping[str, Any]) -> Mapping[str, Any]:
        while "$ref" in node:
            ref = str(node["$ref"])
            if not ref.startswith("#/"):
                raise ValueError(f"only local $refs are supported: {ref}")
            target: Any = self.spec
            for part in ref[2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            node = target
        return node

    def _header_faults(self, response: Mapping[str, Any], headers: Mapping[str, str]) -> list[str]:
        present = {name.lower(): value for name, value in headers.items()}
        found: list[str] = []
        for name, declared in response.get("headers", {}).items():
            value = present.get(name.lower())
            if value is None:
                if declared.get("x-required"):
                    found.append(f"header {name} is required but absent")
                continue
            if declared.get("type") == "integer" and not _WHOLE_NUMBER.fullmatch(value.strip()):
                found.append(f"header {name} must be an integer, got {value!r}")
        return found

    def _body_faults(
        self, schema: Mapping[str, Any], status: int, headers: Mapping[str, str], body: bytes
    ) -> list[str]:
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        expected = PROBLEM_JSON if schema.get("$ref") == PROBLEM_REF else PLAIN_JSON
        found: list[str] = []
        if media_type != expected:
            found.append(f"Content-Type is {content_type or 'absent'!r}, expected {expected}")
        if media_type not in self.produces:
            found.append(
                f"media type {media_type or 'absent'!r} is not in the spec's produces {list(self.produces)}"
            )
        try:
            document = json.loads(body)
        except ValueError as exc:
            return [*found, f"body is not JSON ({exc})"]
        validator = Draft4Validator(
            {**schema, "definitions": self.spec.get("definitions", {})}, format_checker=self._format_checker
        )
        for error in sorted(validator.iter_errors(document), key=lambda e: [str(s) for s in e.absolute_path]):
            where = _json_path(error.absolute_path)
            found.append(
                f"body{where}: {error.message} (schema {_json_path(error.absolute_schema_path, '/')})"
            )
        problem_status = document.get("status", status) if isinstance(document, dict) else status
        if media_type == PROBLEM_JSON and (problem_status != status or isinstance(problem_status, bool)):
            found.append(
                f"body.status is {problem_status!r}, but a problem's status is the HTTP status "
                f"{status} (RFC 9457 §3.1.2)"
            )
        return found

    # --- the aiohttp hook -----------------------------------------------------------------------------

    def trace_config(self, seen: list[OpenApiViolation]) -> aiohttp.TraceConfig:
        """A TraceConfig that checks every answer under basePath as it arrives (its body is read then,
        and stays readable: aiohttp keeps it for `.text()` and `.json()`). A faulty answer raises
        OpenApiViolation from the request itself, and is added to `seen` too, so that the fixture can fail
        a test that swallowed the exception."""

        async def on_request_end(
            session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestEndParams
        ) -> None:
            path = params.url.path
            if not self.covers(path):
                return
            response = params.response
            body = await response.read()
            found = self.violations(params.method, path, response.status, response.headers, body)
            if found:
                violation = OpenApiViolation(describe(params.method, path, response.status, found, body))
                seen.append(violation)
                raise violation

        config = aiohttp.TraceConfig()
        config.on_request_end.append(on_request_end)
        return config


@cache
def spec_answers() -> OpenApiAnswers:
    """openapi.yaml, loaded once per test process."""
    return OpenApiAnswers.load()


def describe(method: str, path: str, status: int, found: list[str], body: bytes) -> str:
    excerpt = body[:600].decode("utf-8", "replace") + ("…" if len(body) > 600 else "")
    faults = "\n".join(f"  - {line}" for line in found)
    return (
        f"openapi.yaml does not describe the answer to {method.upper()} {path}: status {status}\n"
        f"{faults}\n  body: {excerpt}"
    )


def _template_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}/]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def _json_path(path: Any, sep: str = "") -> str:
    steps = list(path)
    if sep:
        return sep.join(str(s) for s in steps)
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps)
