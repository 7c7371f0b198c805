"""Plain unit tests: TimeSpan and NCRONTAB parsing, host.json and local.settings.json, routes, decoding."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from azure.functions.decorators.http import HttpTrigger

from devhost.config import (
    ConfigError,
    QueueOptions,
    load_host_json,
    load_local_settings,
    parse_timespan,
    resolve_setting_refs,
    storage_connection_string,
)
from devhost.host import FunctionSpec, HttpRouter, RouteTemplate
from devhost.queues import decode_body
from devhost.timers import CronSchedule, IntervalSchedule, parse_schedule


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- TimeSpan ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("00:00:02", 2.0),
        ("00:01", 60.0),
        ("1.02:03:04.5", 93784.5),
        ("00:00:00.100", 0.1),
        (1500, 1.5),  # a JSON number is milliseconds (the Functions v1 form)
        (0, 0.0),
    ],
)
def test_timespan_accepted_forms(value: object, seconds: float) -> None:
    assert parse_timespan(value, setting="x") == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", ["2000", "abc", "00:60:00", "24:00:00", "-00:00:01", -1, True, None, "1:2:3:4"]
)
def test_timespan_refused_forms_name_the_setting(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^poll"):
        parse_timespan(value, setting="poll")


# --- host.json -----------------------------------------------------------------------------------------


def test_queue_defaults_are_the_real_hosts() -> None:
    assert QueueOptions.from_section(None) == QueueOptions(
        batch_size=16,
        new_batch_threshold=8,
        max_polling_interval=60.0,
        visibility_timeout=0.0,
        max_dequeue_count=5,
        message_encoding="base64",
    )


@pytest.mark.parametrize(
    "section",
    [
        {"batchSize": 33},
        {"batchSize": 0},
        {"messageEncoding": "utf8"},
        {"maxPollingInterval": "00:00:00.050"},
    ],
)
def test_queue_options_out_of_range_are_refused(section: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"extensions\.queues"):
        QueueOptions.from_section(section)


def test_host_json_keys_are_case_insensitive_and_app_settings_override(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    document = {
        "Extensions": {"HTTP": {"RoutePrefix": "/v1/"}, "Queues": {"BatchSize": 4, "visibilityTimeout": 3000}}
    }
    path.write_text(json.dumps(document))
    environ = {"AzureFunctionsJobHost__extensions__queues__maxDequeueCount": "2"}
    config = load_host_json(path, environ)
    assert config.route_prefix == "v1"
    assert config.queues.batch_size == 4
    assert config.queues.new_batch_threshold == 2  # derived from the batch size
    assert config.queues.visibility_timeout == 3.0
    assert config.queues.max_dequeue_count == 2


def test_missing_host_json_means_defaults_and_empty_prefix_is_allowed() -> None:
    assert load_host_json(None, {}).route_prefix == "api"
    environ = {"AzureFunctionsJobHost__extensions__http__routePrefix": ""}
    assert load_host_json(None, environ).route_prefix == ""


# --- local.settings.json -------------------------------------------------------------------------------


def test_local_settings_fill_the_environment_but_never_override_it(tmp_path: Path) -> None:
    path = tmp_path / "local.settings.json"
    values = {"A": "file", "B": "file"}
    path.write_text(json.dumps({"IsEncrypted": False, "Values": values, "Host": {"LocalHttpPort": 7090}}))
    environ = {"A": "environment"}
    loaded = load_local_settings(path, environ)
    assert environ == {"A": "environment", "B": "file"}
    assert loaded.applied == ("B",)
    assert loaded.kept_from_environment == ("A",)
    assert loaded.http_port == 7090


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"IsEncrypted": True, "Values": {}}, "encrypted"),
        ({"Values": {"N": 5}}, "Values.N must be a string"),
        ({"Values": []}, "Values must be an object"),
    ],
)
def test_local_settings_problems_are_named(tmp_path: Path, document: dict[str, Any], message: str) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=message):
        load_local_settings(path, {})


# --- settings references and connections ---------------------------------------------------------------


def test_setting_references_resolve_or_name_the_missing_setting() -> None:
    assert resolve_setting_refs("%Q%-x-%R%", {"Q": "a", "R": "b"}, where="f") == "a-x-b"
    assert resolve_setting_refs("plain", {}, where="f") == "plain"
    with pytest.raises(ConfigError, match="f: app setting 'MISSING'"):
        resolve_setting_refs("%MISSING%", {}, where="f")


def test_connection_lookup() -> None:
    assert storage_connection_string(None, {"AzureWebJobsStorage": "cs"}, where="f") == "cs"
    assert storage_connection_string("Other", {"AzureWebJobsOther": "cs2"}, where="f") == "cs2"
    with pytest.raises(ConfigError, match="identity-based"):
        storage_connection_string(None, {"AzureWebJobsStorage__queueServiceUri": "https://x"}, where="f")
    with pytest.raises(ConfigError, match="'Nope' is not set"):
        storage_connection_string("Nope", {}, where="f")


# --- NCRONTAB ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("*/15 * * * * *", "2026-11-27T12:00:07", "2026-11-27T12:00:15"),
        ("*/15 * * * * *", "2026-11-27T12:00:45", "2026-11-27T12:01:00"),
        ("0 */5 * * * *", "2026-11-27T12:03:00", "2026-11-27T12:05:00"),
        ("0 30 9 * * 1-5", "2026-11-27T10:00:00", "2026-11-30T09:30:00"),  # Friday → Monday
        ("0 0 12 * * Sun", "2026-11-27T00:00:00", "2026-11-29T12:00:00"),
        ("0 0 12 * * 7", "2026-11-27T00:00:00", "2026-11-29T12:00:00"),  # 7 is Sunday too
        ("0 0 0 1 Jan *", "2026-11-27T00:00:00", "2027-01-01T00:00:00"),
        ("5/20 0 0 * * *", "2026-11-27T00:00:06", "2026-11-27T00:00:25"),
        ("0 0 0 1 * 1", "2026-01-01T00:00:00", "2026-06-01T00:00:00"),  # day AND weekday (NCrontab)
        ("0 0 0,12 * * *", "2026-12-31T23:59:59", "2027-01-01T00:00:00"),
        ("10-12 0 0 * * *", "2026-11-27T00:00:10", "2026-11-27T00:00:11"),
    ],
)
def test_ncrontab_next_occurrence(expression: str, after: str, expected: str) -> None:
    assert CronSchedule.parse(expression).next_after(at(after)) == at(expected)


def test_next_occurrence_is_strictly_later_even_from_a_fraction_of_a_second_before() -> None:
    schedule = CronSchedule.parse("* * * * * *")
    assert schedule.next_after(at("2026-11-27T12:00:00.999")) == at("2026-11-27T12:00:01")
    assert schedule.next_after(at("2026-11-27T12:00:01")) == at("2026-11-27T12:00:02")


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("* * * * *", "six fields"),
        ("60 * * * * *", "second field"),
        ("* * 24 * * *", "hour field"),
        ("* * * * 13 *", "month field"),
        ("*/0 * * * * *", "step"),
        ("5-1 * * * * *", "reversed"),
        ("x * * * * *", "not a number"),
        ("0 0 0 31 2 *", "never fires"),
    ],
)
def test_ncrontab_errors(expression: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CronSchedule.parse(expression)


def test_timespan_schedule_is_an_interval() -> None:
    schedule = parse_schedule("00:05:00")
    assert isinstance(schedule, IntervalSchedule)
    assert schedule.next_after(at("2026-11-27T12:00:00")) == at("2026-11-27T12:05:00")


# --- routes --------------------------------------------------------------------------------------------


def test_route_template_forms() -> None:
    items = RouteTemplate.compile("api/items/{id:int}/{part?}")
    assert items.match("/api/items/42") == {"id": "42"}
    assert items.match("/api/ITEMS/42/a%20b/") == {"id": "42", "part": "a b"}
    assert items.match("/api/items/x") is None
    assert items.match("/api/items/42/a/b") is None
    rest = RouteTemplate.compile("api/files/{*path}")
    assert rest.match("/api/files/a/b%2Fc.txt") == {"path": "a/b/c.txt"}
    assert rest.match("/api/files") == {}
    assert RouteTemplate.compile("api/{name}.{ext}").match("/api/report.tar.gz") == {
        "name": "report",
        "ext": "tar.gz",
    }
    assert RouteTemplate.compile("api/{kind=all}").match("/api") == {"kind": "all"}
    assert RouteTemplate.compile("api/{id:regex(^\\d+$)}").match("/api/anything") == {"id": "anything"}


def _http(name: str, route: str, methods: list[str] | None = None) -> FunctionSpec:
    trigger = HttpTrigger(name="req", methods=methods, route=route)  # type: ignore[arg-type]
    return FunctionSpec(name, trigger, lambda req: None, "req", False)


def test_router_prefers_literals_and_filters_methods() -> None:
    router = HttpRouter.build(
        [
            _http("by_id", "ops/{id}"),
            _http("health", "ops/health", ["GET"]),
            _http("post_only", "ops/{id}/x", ["POST"]),
        ],
        "api",
    )
    matched = router.match("GET", "/api/ops/health")
    assert matched is not None and matched[0].name == "health"
    matched = router.match("POST", "/api/ops/health")
    assert matched is not None and matched[0].name == "by_id"  # health is GET-only
    assert router.match("GET", "/api/ops/1/x") is None


# --- message bodies ------------------------------------------------------------------------------------


def test_decode_body() -> None:
    assert decode_body("aGVs\nbG8=", "base64") == b"hello"  # whitespace is ignored, as in .NET
    assert decode_body("not base64!", "none") == b"not base64!"
    for bad in ("not base64!", "aGVsbG8", "aGVs*bG8="):
        with pytest.raises(ValueError, match="base64"):
            decode_body(bad, "base64")
